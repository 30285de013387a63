"""Paired fidelity: PSNR and SSIM against an aligned truth, raw and after a least-squares affine calibration.

*Raw* scores compare intensities as they are, so an output with the right structure but the wrong
brightness or contrast loses. *Calibrated* scores first map the candidate onto the truth by the affine
``a x + b`` that minimises the squared error on that slice, so calibration does not count and structure
does. Both use skimage's ``peak_signal_noise_ratio`` and ``structural_similarity`` (uniform 7x7 window,
the skimage default, shrunk to fit small images).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def affine_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` minimising ``sum((a x + b - y)^2)``; a constant ``x`` gets ``a = 0, b = mean(y)``."""
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    xc = x - x.mean()
    sxx = float(xc @ xc)
    a = float(xc @ (y - y.mean())) / sxx if sxx > 0 else 0.0
    return a, float(y.mean() - a * x.mean())


def calibrate(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x`` mapped onto ``y`` by their least-squares affine (float64, shape of ``x``)."""
    a, b = affine_fit(x, y)
    return a * np.asarray(x, np.float64) + b


def psnr(x: np.ndarray, truth: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR in dB of ``x`` against ``truth`` (``inf`` when identical)."""
    x = np.asarray(x, np.float64)
    truth = np.asarray(truth, np.float64)
    if np.array_equal(x, truth):
        return float("inf")
    return float(peak_signal_noise_ratio(truth, x, data_range=data_range))


def ssim(x: np.ndarray, truth: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM of ``x`` against ``truth`` (NaN for images under 3 px on a side)."""
    x = np.asarray(x, np.float64)
    truth = np.asarray(truth, np.float64)
    side = min(x.shape)
    if side < 3:
        return float("nan")
    win = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(truth, x, data_range=data_range, win_size=win))


def paired_scores(x: np.ndarray, truth: np.ndarray, data_range: float = 1.0,
                  calibration_source: np.ndarray | None = None) -> dict[str, float]:
    """``psnr``/``ssim`` of ``x`` against ``truth`` and ``psnr_cal``/``ssim_cal`` after the affine map.

    ``calibration_source`` (default ``x``) is what the affine maps onto ``truth``: pass the candidate
    before any clipping so a scaled and shifted copy of the truth calibrates exactly.
    """
    cal = calibrate(x if calibration_source is None else calibration_source, truth)
    return {"psnr": psnr(x, truth, data_range), "ssim": ssim(x, truth, data_range),
            "psnr_cal": psnr(cal, truth, data_range), "ssim_cal": ssim(cal, truth, data_range)}
