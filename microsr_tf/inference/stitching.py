"""A slice's posterior: the whole-slice Monte Carlo result, optionally post-processed as the paper does.

``whole`` (default) is the posterior of the whole slice, computed exactly whatever the slice's size:
:class:`~microsr_tf.inference.mc.MonteCarloPredictor` cuts the work into chunks of samples and, for a
local decoder, stripes of rows, none of which changes the answer. There are no tiles to blend, so there
is no seam, no background tile normalised from its own near-constant content, and no tile pattern in
the variance.

``paper`` follows section 2 of the paper on top of that posterior: 256 px tiles at stride 128, each
tile's mean histogram-matched to the input's tile, plain averaging in the overlaps, then a median
filter. The variance is carried through the same steps, so it describes the mean that is returned: each
tile's matching is a monotone map ``phi`` and a sample ``y`` near the mean becomes
``phi(mean) + phi'(mean) (y - mean)``, so the variance is multiplied by the square of the averaged
slopes (the delta method); the median filter returns, at each pixel, the mean of one neighbour, and the
variance of that same neighbour is returned with it. Percentiles go through the same maps (a monotone
map moves percentiles with it).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from skimage.exposure import match_histograms

from microsr_tf.errors import ConfigError, InputError
from microsr_tf.inference.mc import MCResult, MonteCarloPredictor, resolve_seed
from microsr_tf.models.generator import DOWNSCALE
from microsr_tf.patches import tile_grid

MODES = ("whole", "paper")
PAPER_TILE = 256  # the paper's patch size; tiles overlap by half
_SLOPE_WINDOW = 0.01  # share of a tile's distinct values the histogram map's slope is measured across


def predict_slice(predictor: MonteCarloPredictor, image2d: np.ndarray, mode: str = "whole", *,
                  paper_tile: int = PAPER_TILE, median_size: int = 3) -> MCResult:
    """Posterior mean and variance (``[H, W]``) of a whole 2-D slice in [0, 1] of any size.

    The slice is reflect-padded at the bottom/right to a multiple of 4 (the generator's stride) and
    cropped back. The seed is the predictor's (one is drawn when it has none, and recorded). ``paper``
    mode histogram-matches ``paper_tile`` tiles and median-filters with ``median_size`` (see the module
    docstring).
    """
    image = _check_slice(image2d)
    if mode not in MODES:
        raise ConfigError(f"stitching mode must be one of {MODES}, got {mode!r}")
    for name, value in (("paper_tile", paper_tile), ("median_size", median_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    seed = resolve_seed(predictor.seed)
    h, w = image.shape
    padded = _pad_to(image, (_ceil(h, DOWNSCALE), _ceil(w, DOWNSCALE)))
    result = predictor.predict(padded[None, ..., None], seed=seed)
    crop = (0, slice(0, h), slice(0, w), 0)
    mean, var = result.mean[crop], result.var[crop]
    pct = {q: p[crop] for q, p in (result.percentiles or {}).items()}
    if mode == "paper":
        mean, var, pct = paper_postprocess(mean, var, image, pct, tile=paper_tile, median_size=median_size)
    return MCResult(mean=mean.astype(np.float32), var=var.astype(np.float32), samples=result.samples, seed=seed,
                    percentiles={q: p.astype(np.float32) for q, p in pct.items()} or None,
                    convergence=result.convergence, image_samples=result.image_samples)


def paper_postprocess(mean: np.ndarray, var: np.ndarray, reference: np.ndarray,
                      percentiles: dict[float, np.ndarray] | None = None, tile: int = PAPER_TILE,
                      median_size: int = 3) -> tuple[np.ndarray, np.ndarray, dict[float, np.ndarray]]:
    """The paper's whole-slice reconstruction applied to a posterior: per-tile histogram matching of the
    mean to ``reference`` (the input slice) at stride ``tile // 2``, plain averaging in overlaps, median
    filter; the variance and percentiles follow the same maps (module docstring)."""
    shape = mean.shape
    eff = min(int(tile), max(shape))
    padded_shape = (max(shape[0], eff), max(shape[1], eff))
    m, v, ref = (_pad_to(np.asarray(a, np.float64), padded_shape) for a in (mean, var, reference))
    pct = {q: _pad_to(np.asarray(p, np.float64), padded_shape) for q, p in (percentiles or {}).items()}
    count = np.zeros(padded_shape)
    mapped, slope = np.zeros(padded_shape), np.zeros(padded_shape)
    mapped_pct = {q: np.zeros(padded_shape) for q in pct}
    for i, j in tile_grid(padded_shape, eff, max(1, eff // 2)):
        where = (slice(i, i + eff), slice(j, j + eff))
        xp, fp = _histogram_map(m[where], ref[where])
        mapped[where] += np.interp(m[where], xp, fp)
        slope[where] += _map_slope(xp, fp, m[where])
        for q, p in pct.items():
            mapped_pct[q][where] += np.interp(p[where], xp, fp)
        count[where] += 1.0
    crop = (slice(0, shape[0]), slice(0, shape[1]))
    mapped, slope = (mapped / count)[crop], (slope / count)[crop]
    var_mapped = slope ** 2 * v[crop]
    pick = _median_pick(mapped, median_size)
    return (_take(mapped, pick), _take(var_mapped, pick),
            {q: _take((p / count)[crop], pick) for q, p in mapped_pct.items()})


def _histogram_map(source: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The monotone map of ``skimage.exposure.match_histograms(source, template)`` as sample points: the
    distinct source values and what they become."""
    matched = match_histograms(source, template)
    xp, first = np.unique(source.ravel(), return_index=True)
    return xp, matched.ravel()[first]


def _map_slope(xp: np.ndarray, fp: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Slope of the piecewise-linear map ``(xp, fp)`` at ``at``, measured across a window of distinct values
    (a histogram map is a staircase at the scale of single values)."""
    if xp.size < 2:
        return np.zeros_like(at)
    half = max(1, int(round(_SLOPE_WINDOW * xp.size / 2)))
    idx = np.clip(np.searchsorted(xp, at), 0, xp.size - 1)
    lo, hi = np.clip(idx - half, 0, xp.size - 1), np.clip(idx + half, 0, xp.size - 1)
    return (fp[hi] - fp[lo]) / (xp[hi] - xp[lo])


def _median_pick(image: np.ndarray, size: int) -> np.ndarray:
    """For each pixel, the flat index of the neighbour whose value is the median of its ``size x size``
    neighbourhood (borders mirrored as ``scipy.ndimage.median_filter``'s default)."""
    h, w = image.shape
    r = size // 2
    index = np.pad(np.arange(h * w).reshape(h, w), ((r, size - 1 - r), (r, size - 1 - r)), mode="symmetric")
    values = np.pad(image, ((r, size - 1 - r), (r, size - 1 - r)), mode="symmetric")
    windows = sliding_window_view(values, (size, size)).reshape(h, w, -1)
    order = np.argsort(windows, axis=-1, kind="stable")[..., (size * size) // 2]
    return np.take_along_axis(sliding_window_view(index, (size, size)).reshape(h, w, -1), order[..., None],
                              axis=-1)[..., 0]


def _take(image: np.ndarray, pick: np.ndarray) -> np.ndarray:
    return image.ravel()[pick]


def _check_slice(image2d) -> np.ndarray:
    image = np.asarray(image2d, dtype=np.float32)
    if image.ndim != 2 or image.size == 0:
        raise InputError(None, f"expected a non-empty 2-D slice, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise InputError(None, "slice contains NaN or Inf values")
    return image


def _ceil(n: int, k: int) -> int:
    return -(-int(n) // k) * k


def _pad_to(image: np.ndarray, shape2: tuple[int, int]) -> np.ndarray:
    """Reflect-pad at the bottom/right up to ``shape2`` (crop back with ``[:h, :w]``)."""
    pad = ((0, shape2[0] - image.shape[0]), (0, shape2[1] - image.shape[1]))
    if not any(p[1] for p in pad):
        return image
    mode = "reflect" if min(image.shape) > 1 else "edge"
    return np.pad(image, pad, mode=mode)
