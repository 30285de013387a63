"""Uncertainty quality on paired data: does the predicted standard deviation say where the errors are?

* **Spearman** rank correlation between predicted std and absolute error (``scipy.stats.spearmanr``).
* **Calibration curve**: pixels in equal-count bins of predicted std; per bin the root-mean-square
  predicted std against the observed RMSE (both root-mean-square, so a model whose errors have exactly
  the predicted std lies on the diagonal whatever the spread of std inside a bin); the overall ratio RMSE / RMS std
  summarises it (1 calibrated, above 1 over-confident).
* **Sparsification** (Ilg et al., "Uncertainty Estimates and Multi-Hypotheses Networks for Optical
  Flow", ECCV 2018): remove the fraction ``f`` of pixels with the highest predicted std and take the
  mean absolute error of the rest, normalised by the error with nothing removed. The *oracle* removes
  pixels in order of their true error (the best any ordering can do); the sparsification error is the
  curve minus the oracle, and its area over ``f`` in [0, 0.99] is the **AUSE** (0 for an oracle-ordered
  uncertainty). A seeded random ordering gives the AUSE of an uninformative uncertainty for comparison.
  Ties in std are broken at random, so a constant std behaves like the random ordering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.integrate import trapezoid
from scipy.stats import spearmanr

FRACTIONS = np.round(np.arange(100) / 100.0, 2)  # 0, 0.01, ..., 0.99 as in Ilg et al.


def spearman(std: np.ndarray, error: np.ndarray) -> float:
    """Spearman's rho between predicted std and absolute error (NaN if either is constant)."""
    std, error = np.ravel(std), np.abs(np.ravel(error))
    if std.size < 3 or np.ptp(std) == 0 or np.ptp(error) == 0:
        return float("nan")
    return float(spearmanr(std, error).statistic)


def rmse_ratio(std: np.ndarray, error: np.ndarray) -> float:
    """Observed RMSE over root-mean-square predicted std (1 = calibrated on average)."""
    rms_std = float(np.sqrt(np.mean(np.square(np.ravel(std), dtype=np.float64))))
    rmse = float(np.sqrt(np.mean(np.square(np.ravel(error), dtype=np.float64))))
    return rmse / rms_std if rms_std > 0 else float("nan")


def calibration_curve(std: np.ndarray, error: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``(RMS predicted std, observed RMSE)`` per equal-count bin of predicted std (ascending)."""
    std = np.ravel(std).astype(np.float64)
    error = np.ravel(error).astype(np.float64)
    order = np.argsort(std, kind="stable")
    groups = [g for g in np.array_split(order, min(bins, std.size)) if g.size]
    return (np.array([np.sqrt(np.mean(std[g] ** 2)) for g in groups]),
            np.array([np.sqrt(np.mean(error[g] ** 2)) for g in groups]))


def _removal_curve(order: np.ndarray, error: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Mean error left after removing the first ``floor(f n)`` pixels of ``order``, over the initial mean."""
    ordered = error[order]
    tail = np.cumsum(ordered[::-1])[::-1]  # tail[k] = sum of ordered[k:]
    n = ordered.size
    k = np.minimum(np.floor(fractions * n).astype(np.int64), n - 1)
    remaining = tail[k] / (n - k)
    return remaining / remaining[0] if remaining[0] > 0 else np.zeros_like(remaining)


@dataclass
class Sparsification:
    """Sparsification curves (normalised mean absolute error left) and their areas."""

    fractions: np.ndarray
    by_uncertainty: np.ndarray
    oracle: np.ndarray
    random: np.ndarray
    ause: float  # area between the uncertainty curve and the oracle
    ause_random: float  # the same for a random ordering


def sparsification(std: np.ndarray, error: np.ndarray, seed: int = 0,
                   fractions: np.ndarray = FRACTIONS) -> Sparsification:
    """Sparsification curves of ``|error|`` ordered by ``std``, by the error itself and at random."""
    std = np.ravel(std).astype(np.float64)
    error = np.abs(np.ravel(error).astype(np.float64))
    if std.size == 0 or std.size != error.size:
        raise ValueError(f"std and error need the same, non-zero number of values ({std.size} vs {error.size})")
    rng = np.random.default_rng(seed)
    tiebreak = rng.random(std.size)
    by_std = _removal_curve(np.lexsort((tiebreak, -std)), error, fractions)
    oracle = _removal_curve(np.lexsort((tiebreak, -error)), error, fractions)
    random = _removal_curve(rng.permutation(std.size), error, fractions)
    return Sparsification(fractions=fractions, by_uncertainty=by_std, oracle=oracle, random=random,
                          ause=float(trapezoid(by_std - oracle, fractions)),
                          ause_random=float(trapezoid(random - oracle, fractions)))
