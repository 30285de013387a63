"""Paper section 3 preprocessing: bicubic voxel-size matching, Otsu ROI, z-score -> [0, 1] intensities.

LR slices are refined in-plane by ``factors = LR spacing / HR spacing`` onto exactly the grid of
:func:`microsr_tf.volumes.resampled_affine`; each slice is cropped to the bounding box of its
foreground; intensities are z-scored with foreground statistics and mapped to [0, 1] from the low end
of the whole scan (air) to the high end of its foreground (dense bone), both robust percentiles, which
:class:`IntensityStats` records so outputs can be mapped back to physical units. Mapping the whole
range matters: clipping at the foreground's own low end would send air and soft tissue alike to 0.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.sparse
from skimage.filters import threshold_otsu

from .errors import InputError
from .volumes import Volume, resampled_shape

PERCENTILES = (0.5, 99.5)  # [0, 1] spans this low percentile of all voxels to this high one of the foreground
SAMPLES_PER_SLICE = 1 << 17  # voxels kept per slice for volume-level statistics (bounded memory)


def upsample_factors(lr_spacing2: Sequence[float], hr_spacing2: Sequence[float],
                     path: str | os.PathLike | None = None) -> tuple[float, float]:
    """In-plane refinement factors ``lr / hr`` (old / new spacing).

    InputError unless the LR grid is coarser: no axis finer than the HR target and at least one
    strictly coarser (super-resolution from a grid that is already as fine has nothing to do).
    """
    lr = tuple(float(s) for s in lr_spacing2)
    hr = tuple(float(s) for s in hr_spacing2)
    if len(lr) != 2 or len(hr) != 2 or not all(math.isfinite(s) and s > 0 for s in lr + hr):
        raise InputError(path, f"in-plane spacings must be two positive numbers, got LR {lr} and HR {hr}")
    factors = tuple(a / b for a, b in zip(lr, hr))
    if min(factors) < 1.0 - 1e-9 or max(factors) <= 1.0 + 1e-9:
        raise InputError(path, f"LR in-plane spacing {_mm(lr)} is not coarser than the HR target {_mm(hr)}")
    return max(factors[0], 1.0), max(factors[1], 1.0)


def check_coarser(lr_path: str | os.PathLike, lr_spacing2: Sequence[float],
                  hr_spacing2: Sequence[float]) -> tuple[float, float]:
    """:func:`upsample_factors` with the error naming the LR file."""
    return upsample_factors(lr_spacing2, hr_spacing2, path=lr_path)


def _mm(spacing: Sequence[float]) -> str:
    return " x ".join(f"{s:g}" for s in spacing) + " mm"


def _keys(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5 (the bicubic of MATLAB's imresize and PIL)."""
    t = np.abs(t)
    near = (1.5 * t - 2.5) * t * t + 1.0
    far = ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


@functools.lru_cache(maxsize=32)
def _cubic_matrix(n: int, f: float) -> scipy.sparse.csr_matrix:
    """Sparse ``(round(n f), n)`` matrix sampling a length-``n`` signal at ``(j + 0.5) / f - 0.5``.

    For ``f < 1`` (downsampling) the kernel is stretched by ``1 / f`` and each row's weights are
    normalised to sum to 1, so it low-passes at the new grid's Nyquist frequency instead of aliasing
    (the antialiasing of MATLAB's ``imresize`` and Pillow's bicubic ``resize``).
    """
    m = resampled_shape((n, 1, 1), -1, (f, 1.0))[0]
    x = (np.arange(m) + 0.5) / f - 0.5
    if f < 1.0:
        width = int(np.ceil(4.0 / f)) + 1
        taps = np.floor(x - 2.0 / f).astype(np.int64)[:, None] + np.arange(1, width + 1)[None, :]
        weights = _keys((x[:, None] - taps) * f)
        weights /= weights.sum(axis=1, keepdims=True)
        cols = np.clip(taps, 0, n - 1)
        rows = np.repeat(np.arange(m), width)
        return scipy.sparse.csr_matrix((weights.ravel(), (rows, cols.ravel())), shape=(m, n))
    base = np.floor(x).astype(np.int64)
    taps = base[:, None] + np.arange(-1, 3)[None, :]
    weights = _keys(x[:, None] - taps)
    cols = np.clip(taps, 0, n - 1)  # replicate the border
    rows = np.repeat(np.arange(m), 4)
    return scipy.sparse.csr_matrix((weights.ravel(), (rows, cols.ravel())), shape=(m, n))


def resample_slice(slice2d: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """Bicubic in-plane resampling onto the grid of :func:`~microsr_tf.volumes.resampled_affine`.

    Output pixel ``(j0, j1)`` is the Keys (a = -0.5) cubic interpolant at input position
    ``((j0 + 0.5) / f0 - 0.5, (j1 + 0.5) / f1 - 0.5)`` with the border replicated, computed as two
    sparse 4-tap matrix products in float64. A factor below 1 coarsens that axis, anti-aliased by
    the kernel stretched by ``1 / f`` (see :func:`_cubic_matrix`). OpenCV is not used: its bicubic
    fixes a = -0.75, which bends linear ramps, and ``warpAffine`` rounds sample positions to 1/32 pixel.
    """
    img = np.asarray(slice2d)
    if img.ndim != 2:
        raise ValueError(f"resample_slice needs a 2-D slice, got shape {img.shape}")
    f0, f1 = (float(f) for f in factors)
    if f0 == 1.0 and f1 == 1.0:
        return img.astype(np.float32, copy=True)
    rows = _cubic_matrix(img.shape[0], f0) @ img.astype(np.float64)
    return (_cubic_matrix(img.shape[1], f1) @ rows.T).T.astype(np.float32)


@functools.lru_cache(maxsize=32)
def area_matrix(n_coarse: int, n_fine: int, factor: float) -> scipy.sparse.csr_matrix:
    """Sparse ``(n_coarse, n_fine)`` averaging matrix: coarse pixel ``i`` covers fine coordinates
    ``[i f, (i + 1) f)`` and each fine pixel ``[j, j + 1)`` contributes its overlap; rows sum to 1 (a
    coarse pixel reaching past the fine grid averages the part that exists)."""
    f = float(factor)
    rows, cols, vals = [], [], []
    for i in range(n_coarse):
        lo, hi = i * f, (i + 1) * f
        for j in range(max(0, math.floor(lo)), min(n_fine, math.ceil(hi))):
            w = min(j + 1.0, hi) - max(float(j), lo)
            if w > 1e-12:
                rows.append(i)
                cols.append(j)
                vals.append(w)
    m = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(n_coarse, n_fine))
    sums = np.asarray(m.sum(axis=1)).ravel()
    if (sums <= 0).any():
        raise ValueError(f"{n_fine} fine pixels at factor {f:g} do not cover {n_coarse} coarse pixels")
    return scipy.sparse.diags(1.0 / sums) @ m


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold separating background from tissue/bone (``skimage.filters.threshold_otsu``)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("otsu_threshold needs at least one value")
    if values.min() == values.max():
        return float(values[0])
    return float(threshold_otsu(values))


def foreground_mask(slice2d: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of voxels strictly above ``threshold``."""
    return np.asarray(slice2d) > threshold


def roi_bbox(slice2d: np.ndarray, threshold: float, margin: int) -> tuple[slice, slice] | None:
    """Bounding box of the foreground grown by ``margin`` pixels and clipped to the slice; None if empty."""
    mask = foreground_mask(slice2d, threshold)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    margin = int(margin)
    return (slice(max(0, rows[0] - margin), min(mask.shape[0], rows[-1] + 1 + margin)),
            slice(max(0, cols[0] - margin), min(mask.shape[1], cols[-1] + 1 + margin)))


@dataclass(frozen=True)
class IntensityStats:
    """Foreground z-score (``mean``, ``std``) and the z-range [``low``, ``high``] mapped onto [0, 1]."""

    mean: float
    std: float
    low: float
    high: float

    def __post_init__(self) -> None:
        values = (self.mean, self.std, self.low, self.high)
        if not all(math.isfinite(float(v)) for v in values):
            raise ValueError(f"intensity statistics must be finite, got {values}")
        if self.std <= 0 or self.high <= self.low:
            raise ValueError(f"intensity statistics need std > 0 and high > low, got {values}")

    @property
    def scale(self) -> float:
        """Physical units per unit of u (so a variance maps back as ``var_u * scale**2``)."""
        return float(self.std * (self.high - self.low))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Physical units -> float32 in [0, 1]: z-score, then clip to [low, high] and rescale."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.std
        return np.clip((z - self.low) / (self.high - self.low), 0.0, 1.0).astype(np.float32)

    def denormalize(self, u: np.ndarray) -> np.ndarray:
        """[0, 1] -> physical units (float32); inverse of :meth:`normalize` inside the clip range."""
        z = np.asarray(u, dtype=np.float64) * (self.high - self.low) + self.low
        return (z * self.std + self.mean).astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IntensityStats":
        missing = [k for k in ("mean", "std", "low", "high") if k not in d]
        if missing:
            raise ValueError(f"intensity statistics lack {', '.join(missing)}")
        return cls(float(d["mean"]), float(d["std"]), float(d["low"]), float(d["high"]))


def _sample_indices(n: int, max_slices: int) -> list[int]:
    """Up to ``max_slices`` evenly spaced slice indices covering ``[0, n)``."""
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, min(n, max(1, int(max_slices))))})


def sample_voxels(vol: Volume, axis: int = -1, max_slices: int = 32,
                  factors: Sequence[float] | None = None) -> np.ndarray:
    """Voxel values from up to ``max_slices`` evenly spaced slices (each resampled by ``factors`` if
    given), thinned to at most ``SAMPLES_PER_SLICE`` per slice so memory stays bounded."""
    parts = []
    for _, arr in vol.iter_slices(axis, _sample_indices(vol.n_slices(axis), max_slices)):
        if factors is not None:
            arr = resample_slice(arr, factors)
        flat = arr.ravel()
        parts.append(flat[:: max(1, -(-flat.size // SAMPLES_PER_SLICE))])
    return np.concatenate(parts)


def volume_threshold(vol: Volume, axis: int = -1, max_slices: int = 32) -> float:
    """Otsu threshold of a volume from evenly spaced slices (the per-volume ROI threshold)."""
    return otsu_threshold(sample_voxels(vol, axis, max_slices))


def volume_stats(vol: Volume, axis: int = -1, threshold: float | None = None,
                 factors: Sequence[float] | None = None, max_slices: int = 32) -> IntensityStats:
    """Foreground intensity statistics of ``vol`` from up to ``max_slices`` evenly spaced slices.

    ``threshold`` (input units) separates foreground; None uses Otsu on the volume's native voxels
    (:func:`volume_threshold`), whether or not ``factors`` is given, so that training and prediction
    draw the same line through the same scan. With ``factors`` the statistics are then taken from
    resampled slices, so they describe what the network sees.
    """
    thr = volume_threshold(vol, axis, max_slices) if threshold is None else float(threshold)
    values = sample_voxels(vol, axis, max_slices, factors)
    fg = values[values > thr].astype(np.float64)
    if fg.size < 2:
        raise InputError(vol.path, f"no foreground above intensity threshold {thr:g}; cannot normalise")
    mean, std = float(fg.mean()), float(fg.std())
    if std <= 0:
        raise InputError(vol.path, f"foreground above {thr:g} is constant ({mean:g}); cannot normalise")
    low = float(np.percentile((values - mean) / std, PERCENTILES[0]))
    high = float(np.percentile((fg - mean) / std, PERCENTILES[1]))
    if high <= low:
        raise InputError(vol.path, f"intensities have no spread between the {PERCENTILES[0]} percentile of the "
                                   f"scan and the {PERCENTILES[1]} percentile of its foreground; cannot normalise")
    return IntensityStats(mean, std, float(low), float(high))


def combine_stats(stats: Sequence[IntensityStats]) -> IntensityStats:
    """Pool several volumes' statistics with equal weight (the HR reference for denormalising).

    Means are averaged, the std is the pooled one (within plus between volumes), and each volume's
    [low, high] is averaged in physical units, then re-expressed as z-values of the pooled statistics.
    Identical inputs give back the same statistics.
    """
    if not stats:
        raise ValueError("combine_stats needs at least one IntensityStats")
    means = np.array([s.mean for s in stats])
    stds = np.array([s.std for s in stats])
    mean = float(means.mean())
    std = float(np.sqrt(np.mean(stds ** 2 + (means - mean) ** 2)))
    low_x = float(np.mean([s.mean + s.low * s.std for s in stats]))
    high_x = float(np.mean([s.mean + s.high * s.std for s in stats]))
    return IntensityStats(mean, std, (low_x - mean) / std, (high_x - mean) / std)
