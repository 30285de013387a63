"""Whole-slice Monte Carlo reconstruction from tiles: smooth blending, the paper's recipe, or one pass.

``blend`` (default) weights overlapping tiles by a Gaussian window (sigma = tile / 8, as MONAI's
sliding-window inferer) and divides by the summed weights, so there is no seam to hide. The variance
is the same weighted average of the tile posterior variances: each tile's Monte Carlo variance
estimates the model uncertainty at a pixel, best where the pixel is central in the tile. Two other
stitchings print the tile grid into the uncertainty map: averaging per-sample stitched images
shrinks the variance wherever independently masked tiles overlap (to about half), and the mixture
(law of total variance) adds the tiles' disagreement about the mean, a cropping artefact rather than
model uncertainty, which is largest in the overlaps. Each tile gets its own dropout seed, derived
from the slice seed and the tile origin: shared seed rows would repeat the same Monte Carlo error in
every tile (masks live in tile coordinates) and make it periodic.
``paper`` follows section 2 of the paper: tiles at stride tile/2, each tile's posterior mean
histogram-matched to its input tile, plain averaging of means and variances in overlaps, then a
median filter on the mean.
``whole`` sends the slice through the fully convolutional generator at once.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import median_filter
from skimage.exposure import match_histograms

from microsr_tf.errors import ConfigError, InputError
from microsr_tf.inference.mc import MCResult, MonteCarloPredictor, resolve_seed
from microsr_tf.patches import patches_at, tile_grid

MODES = ("blend", "paper", "whole")


def gaussian_window(tile: int, sigma_scale: float = 0.125) -> np.ndarray:
    """``[tile, tile]`` float64 Gaussian blending weights peaking at 1 in the centre, sigma = tile * scale."""
    r = np.arange(tile, dtype=np.float64) - (tile - 1) / 2.0
    g = np.exp(-0.5 * (r / (sigma_scale * tile)) ** 2)
    return np.outer(g, g)


def tile_layout(shape2: tuple[int, int], mode: str = "blend", tile: int = 256,
                overlap: float = 0.25) -> tuple[int, int, tuple[int, int], list[tuple[int, int]]]:
    """``(tile, stride, padded_shape, origins)`` used for a slice of ``shape2`` in a tiled ``mode``.

    The tile shrinks to the slice (rounded up to a multiple of 4) when the slice is smaller, so a small
    slice costs one tile; the slice is padded at the bottom/right to at least one tile.
    """
    _check_tiling(mode, tile, overlap)
    eff = min(tile, _ceil4(max(shape2)))
    stride = eff // 2 if mode == "paper" else max(1, int(round(eff * (1.0 - overlap))))
    padded = (max(shape2[0], eff), max(shape2[1], eff))
    return eff, stride, padded, tile_grid(padded, eff, stride)


def tile_redundancy(shape2: tuple[int, int], mode: str = "blend", tile: int = 256, overlap: float = 0.25) -> float:
    """Pixels pushed through the network per slice pixel (1.0 = no overlap work)."""
    eff, _, _, origins = tile_layout(shape2, mode, tile, overlap)
    return len(origins) * eff * eff / float(shape2[0] * shape2[1])


def tile_seed(seed: int, row: int, col: int) -> int:
    """Dropout seed of the tile at ``(row, col)`` of a slice predicted with ``seed``."""
    return int(np.random.SeedSequence([seed, row, col]).generate_state(1)[0] >> 1)


def predict_slice(predictor: MonteCarloPredictor, image2d: np.ndarray, mode: str = "blend", tile: int = 256,
                  overlap: float = 0.25, batch_size: int = 8, *, median_size: int = 3) -> MCResult:
    """Posterior mean and variance (``[H, W]``) of a whole 2-D slice in [0, 1] of any size.

    ``tile`` (a multiple of 4) and ``overlap`` (fraction of the tile, ``blend`` only; ``paper`` always
    uses stride tile/2) set the tiling, ``batch_size`` how many tiles share one predictor call, and
    ``median_size`` the paper's median filter. Tile seeds derive from one slice seed (the predictor's,
    else drawn once per slice) and the tile origins, so results do not depend on ``batch_size``. Percentiles, when the predictor keeps them, are stitched
    with the same weights as the mean, an approximation of the mixture's percentiles.
    """
    image = _check_slice(image2d)
    if mode not in MODES:
        raise ConfigError(f"stitching mode must be one of {MODES}, got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"tile batch_size must be a positive integer, got {batch_size!r}")
    seed = resolve_seed(predictor.seed)
    if mode == "whole":
        return _predict_whole(predictor, image, seed)
    if mode == "paper" and (isinstance(median_size, bool) or not isinstance(median_size, (int, np.integer))
                            or median_size < 1):
        raise ConfigError(f"median_size must be a positive integer, got {median_size!r}")
    eff, _, padded_shape, origins = tile_layout(image.shape, mode, tile, overlap)
    padded = _pad_to(image, padded_shape)
    weight = gaussian_window(eff) if mode == "blend" else np.ones((eff, eff))
    acc = _Accumulator(padded_shape, predictor.percentiles)
    for b in range(0, len(origins), batch_size):
        batch = np.asarray(origins[b:b + batch_size])
        tiles = patches_at(padded, batch, eff)
        result = predictor.predict(tiles[..., None], seed=[tile_seed(seed, i, j) for i, j in batch])
        for k, (i, j) in enumerate(batch):
            mean = result.mean[k, ..., 0]
            if mode == "paper":
                mean = match_histograms(mean, tiles[k])
            pct = {q: p[k, ..., 0] for q, p in (result.percentiles or {}).items()}
            acc.add((slice(i, i + eff), slice(j, j + eff)), weight, mean, result.var[k, ..., 0], pct)
        acc.merge_convergence(result.convergence)
    mean, var, pct = acc.finish()
    crop = (slice(0, image.shape[0]), slice(0, image.shape[1]))
    mean = mean[crop]
    if mode == "paper":
        mean = median_filter(mean, size=median_size)
    return MCResult(mean=mean.astype(np.float32), var=var[crop].astype(np.float32), samples=predictor.samples,
                    seed=seed, percentiles=_crop_all(pct, crop), convergence=acc.convergence)


class _Accumulator:
    """Weighted sums of tile means, variances and percentiles over the padded slice, in float64."""

    def __init__(self, shape2: tuple[int, int], percentiles: tuple[float, ...]):
        self.weight = np.zeros(shape2)
        self.mean = np.zeros(shape2)
        self.var = np.zeros(shape2)
        self.pct = {q: np.zeros(shape2) for q in percentiles}
        self.convergence: dict[str, float] = {}

    def add(self, where, w: np.ndarray, mean: np.ndarray, var: np.ndarray, pct: dict[float, np.ndarray]) -> None:
        """Add one tile's weighted mean, variance and percentiles."""
        self.weight[where] += w
        self.mean[where] += w * mean
        self.var[where] += w * var
        for q, p in pct.items():
            self.pct[q][where] += w * p

    def merge_convergence(self, figures: dict[str, float]) -> None:
        """Keep the worst (largest) convergence figure seen over the tile batches."""
        for key, value in figures.items():
            self.convergence[key] = max(value, self.convergence.get(key, value))

    def finish(self):
        """Normalised mean, variance and percentiles."""
        return (self.mean / self.weight, self.var / self.weight,
                {q: p / self.weight for q, p in self.pct.items()})


def _predict_whole(predictor: MonteCarloPredictor, image: np.ndarray, seed: int) -> MCResult:
    h, w = image.shape
    shape4 = (_ceil4(h), _ceil4(w))
    if not predictor.fits(*shape4):
        need = predictor.bytes_per_sample(*shape4) / 2**20
        raise ConfigError(
            f"a whole {h}x{w} slice needs about {need:.0f} MB per Monte Carlo pass, over memory_budget_mb="
            f"{predictor.memory_budget_mb:g}; use mode='blend' (tiles) or a larger memory budget")
    result = predictor.predict(_pad_to(image, shape4)[None, ..., None], seed=seed)
    crop = (0, slice(0, h), slice(0, w), 0)
    return MCResult(mean=result.mean[crop], var=result.var[crop], samples=result.samples, seed=seed,
                    percentiles=_crop_all(result.percentiles, crop), convergence=result.convergence)


def _crop_all(maps: dict[float, np.ndarray] | None, crop) -> dict[float, np.ndarray] | None:
    return {q: np.asarray(p[crop], np.float32) for q, p in maps.items()} if maps else None


def _check_slice(image2d) -> np.ndarray:
    image = np.asarray(image2d, dtype=np.float32)
    if image.ndim != 2 or image.size == 0:
        raise InputError(None, f"expected a non-empty 2-D slice, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise InputError(None, "slice contains NaN or Inf values")
    return image


def _check_tiling(mode: str, tile: int, overlap: float) -> None:
    if mode not in MODES[:2]:
        raise ConfigError(f"tiled stitching mode must be 'blend' or 'paper', got {mode!r}")
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 8 or tile % 4:
        raise ConfigError(f"tile must be a multiple of 4 and >= 8, got {tile!r}")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"tile overlap must be in [0, 1), got {overlap!r}")


def _ceil4(n: int) -> int:
    return -(-int(n) // 4) * 4


def _pad_to(image: np.ndarray, shape2: tuple[int, int]) -> np.ndarray:
    """Reflect-pad at the bottom/right up to ``shape2`` (crop back with ``[:h, :w]``)."""
    pad = ((0, shape2[0] - image.shape[0]), (0, shape2[1] - image.shape[1]))
    return np.pad(image, pad, mode="reflect") if any(p[1] for p in pad) else image
