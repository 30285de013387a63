"""Patch grids cover every pixel with the expected counts; foreground filtering keeps the right patches."""

from __future__ import annotations

import math

import numpy as np
import pytest

from microsr_tf.patches import patch_origins, patches_at, select_origins, tile_grid


@pytest.mark.parametrize("length", [1, 31, 32, 33, 63, 64, 65, 96, 100, 257])
@pytest.mark.parametrize("patch,stride", [(32, 16), (32, 32), (32, 7), (8, 20)])
def test_patch_origins_cover_every_pixel_without_duplicates(length, patch, stride):
    origins = patch_origins(length, patch, stride)
    assert len(origins) == len(set(origins))
    assert origins == sorted(origins)
    if length <= patch:
        assert origins == [0]
        return
    expected = math.ceil((length - patch) / stride) + 1
    assert len(origins) == expected
    assert origins[0] == 0 and origins[-1] == length - patch
    covered = np.zeros(length, dtype=bool)
    for o in origins:
        covered[o:o + patch] = True
    assert covered.all() == (stride <= patch)
    # regular spacing except possibly the last, shifted-back origin
    assert all(b - a == stride for a, b in zip(origins[:-2], origins[1:-1]))


def test_patch_origins_rejects_bad_arguments():
    with pytest.raises(ValueError):
        patch_origins(10, 0, 1)
    with pytest.raises(ValueError):
        patch_origins(10, 4, 0)
    with pytest.raises(ValueError, match="skipped"):
        tile_grid((64, 64), 16, 17)


@pytest.mark.parametrize("shape", [(64, 64), (70, 100), (32, 33), (20, 80)])
def test_tile_grid_covers_every_pixel(shape):
    tile, stride = 32, 24
    grid = tile_grid(shape, tile, stride)
    assert len(grid) == len(set(grid))
    assert len(grid) == len(patch_origins(shape[0], tile, stride)) * len(patch_origins(shape[1], tile, stride))
    covered = np.zeros(shape, dtype=bool)
    for r, c in grid:
        covered[r:r + tile, c:c + tile] = True
    assert covered.all()


def test_patches_on_the_full_grid_match_slicing(rng):
    image = rng.random((70, 90)).astype(np.float32)
    origins = select_origins(np.ones(image.shape, bool), 32, 16, 0.0)
    patches = patches_at(image, origins, 32)
    n_rows = math.ceil((70 - 32) / 16) + 1
    n_cols = math.ceil((90 - 32) / 16) + 1
    assert patches.shape == (n_rows * n_cols, 32, 32)
    assert patches.dtype == np.float32
    for p, (r, c) in zip(patches, origins):
        np.testing.assert_array_equal(p, image[r:r + 32, c:c + 32])


def test_foreground_filter_rejects_background():
    image = np.zeros((96, 96), dtype=np.float32)
    image[0:40, 0:40] = 1.0  # bright square in the top-left corner
    mask = image > 0.5
    origins = select_origins(mask, 32, 32, 0.25)
    patches = patches_at(image, origins, 32)
    # grid origins 0, 32, 64: the square fills (0,0) fully; (0,32) and (32,0) hold 8*32/1024 = 25%;
    # (32,32) holds 64/1024 = 6.25%; the rest nothing.
    assert sorted(map(tuple, origins.tolist())) == [(0, 0), (0, 32), (32, 0)]
    fractions = [(p > 0.5).mean() for p in patches]
    assert min(fractions) >= 0.25
    assert len(select_origins(mask, 32, 32, 0.0)) == 9


def test_select_origins_matches_brute_force(rng):
    mask = rng.random((81, 67)) > 0.7
    patch, stride, threshold = 16, 10, 0.3
    origins = select_origins(mask, patch, stride, threshold)
    expected = [(r, c) for r, c in tile_grid(mask.shape, patch, stride)
                if mask[r:r + patch, c:c + patch].mean() >= threshold]
    assert list(map(tuple, origins.tolist())) == expected
    assert 0 < len(expected) < len(tile_grid(mask.shape, patch, stride))


def test_image_smaller_than_patch_yields_nothing():
    origins = select_origins(np.ones((20, 50), bool), 32, 16, 0.0)
    assert patches_at(np.ones((20, 50), np.float32), origins, 32).shape == (0, 32, 32) and origins.shape == (0, 2)
    assert patches_at(np.ones((40, 40)), np.zeros((0, 2)), 32).shape == (0, 32, 32)
