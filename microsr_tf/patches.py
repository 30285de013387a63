"""Patch grids: training patches with foreground filtering, and covering tile grids for inference.

Both use the same covering grid along each axis: origins every ``stride`` pixels, plus one last origin
shifted back so that the final patch ends exactly at the edge. No origin repeats, and every pixel is
covered whenever ``stride <= patch`` (a larger stride samples training patches sparsely, with gaps).
Everything here is plain numpy and vectorised.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def patch_origins(length: int, patch: int, stride: int) -> list[int]:
    """Origins along one axis, the last ending at ``length``; ``[0]`` when ``length < patch`` (the caller pads).

    They cover ``[0, length)`` when ``stride <= patch``.
    """
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be positive, got patch={patch}, stride={stride}")
    if length <= patch:
        return [0]
    origins = list(range(0, length - patch + 1, stride))
    if origins[-1] + patch < length:
        origins.append(length - patch)
    return origins


def tile_grid(shape2: tuple[int, int], tile: int, stride: int) -> list[tuple[int, int]]:
    """Row-major ``(row, col)`` tile origins covering every pixel of a ``shape2`` image (``stride <= tile``)."""
    if stride > tile:
        raise ValueError(f"tile stride {stride} exceeds the tile size {tile}: pixels would be skipped")
    rows = patch_origins(int(shape2[0]), tile, stride)
    cols = patch_origins(int(shape2[1]), tile, stride)
    return [(r, c) for r in rows for c in cols]


def select_origins(mask: np.ndarray, patch: int, stride: int, min_foreground: float = 0.0) -> np.ndarray:
    """``[N, 2]`` int origins of the grid patches whose foreground fraction in ``mask`` is >= ``min_foreground``.

    Only patches that fit entirely inside the image are considered (an image smaller than ``patch`` along
    an axis yields none). The fraction comes from an integral image, so the cost does not grow with
    ``patch``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if mask.shape[0] < patch or mask.shape[1] < patch:
        return np.zeros((0, 2), dtype=np.int64)
    rows = np.asarray(patch_origins(mask.shape[0], patch, stride))
    cols = np.asarray(patch_origins(mask.shape[1], patch, stride))
    rr, cc = (a.ravel() for a in np.meshgrid(rows, cols, indexing="ij"))
    if min_foreground > 0.0:
        integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
        integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(bool), axis=0, dtype=np.int64), axis=1)
        counts = (integral[rr + patch, cc + patch] - integral[rr, cc + patch]
                  - integral[rr + patch, cc] + integral[rr, cc])
        keep = counts >= min_foreground * patch * patch
        rr, cc = rr[keep], cc[keep]
    return np.stack([rr, cc], axis=1).astype(np.int64)


def patches_at(image2d: np.ndarray, origins: np.ndarray, patch: int) -> np.ndarray:
    """``[N, patch, patch]`` copies of ``image2d`` at the given ``[N, 2]`` origins."""
    image2d = np.asarray(image2d)
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    if len(origins) == 0:
        return np.zeros((0, patch, patch), dtype=image2d.dtype)
    windows = sliding_window_view(image2d, (patch, patch))
    return np.ascontiguousarray(windows[origins[:, 0], origins[:, 1]])
