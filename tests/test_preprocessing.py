"""Bicubic voxel-size matching, Otsu ROI and intensity normalisation (paper, section 3)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from microsr_tf.errors import InputError
from microsr_tf.preprocessing import (IntensityStats, check_coarser, combine_stats, foreground_mask,
                                      otsu_threshold, resample_slice, roi_bbox, upsample_factors,
                                      volume_stats, volume_threshold)
from microsr_tf.volumes import open_volume, resampled_affine, resampled_shape


def save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


# ---------------------------------------------------------------- factors


def test_upsample_factors_are_old_over_new_spacing():
    f0, f1 = upsample_factors((0.15, 0.3), (0.018, 0.05))
    assert f0 == pytest.approx(0.15 / 0.018) and f1 == pytest.approx(6.0)
    assert upsample_factors((0.2, 0.6), (0.2, 0.2)) == pytest.approx((1.0, 3.0))  # one axis at target
    with pytest.raises(InputError, match="not coarser"):
        upsample_factors((0.2, 0.2), (0.2, 0.2))


def test_lr_not_coarser_than_hr_is_refused_naming_the_file(tmp_path):
    lr = tmp_path / "lr.nii.gz"
    with pytest.raises(InputError) as exc:
        check_coarser(lr, (0.018, 0.15), (0.15, 0.15))
    text = str(exc.value)
    assert text == f"{lr}: LR in-plane spacing 0.018 x 0.15 mm is not coarser than the HR target 0.15 x 0.15 mm"
    with pytest.raises(InputError, match="two positive numbers"):
        check_coarser(lr, (0.0, 0.15), (0.018, 0.018))
    assert check_coarser(lr, (0.15, 0.15), (0.05, 0.03)) == pytest.approx((3.0, 5.0))


# ---------------------------------------------------------------- resampling


def interior(shape, factors, n_in):
    """Output index ranges whose 4 cubic taps all fall inside the input (no border replication)."""
    out = []
    for m, f, n in zip(shape, factors, n_in):
        x = (np.arange(m) + 0.5) / f - 0.5
        ok = (np.floor(x) - 1 >= 0) & (np.floor(x) + 2 <= n - 1)
        out.append(np.flatnonzero(ok))
    return np.ix_(*out)


@pytest.mark.parametrize("factors", [(8.0, 8.0), (8.333, 3.7), (2.5, 1.0)])
def test_linear_ramp_reproduced_exactly_on_the_resampled_grid(factors):
    n0, n1 = 23, 31
    ramp = (0.7 * np.arange(n0)[:, None] - 1.3 * np.arange(n1)[None, :] + 5.0).astype(np.float32)
    out = resample_slice(ramp, factors)
    assert out.dtype == np.float32
    assert out.shape == resampled_shape((n0, n1, 1), -1, factors)[:2]
    x0 = (np.arange(out.shape[0]) + 0.5) / factors[0] - 0.5
    x1 = (np.arange(out.shape[1]) + 0.5) / factors[1] - 0.5
    expected = 0.7 * x0[:, None] - 1.3 * x1[None, :] + 5.0
    inside = interior(out.shape, factors, (n0, n1))
    assert out[inside].size > 0.6 * out.size
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-4, rtol=0)


def test_resampling_keeps_constants_everywhere_and_identity_for_unit_factors(rng):
    np.testing.assert_allclose(resample_slice(np.full((9, 7), 3.25, np.float32), (8.333, 5.0)), 3.25, atol=1e-5)
    img = rng.normal(size=(12, 10)).astype(np.float32)
    np.testing.assert_array_equal(resample_slice(img, (1.0, 1.0)), img)
    # Integer factors hit the input samples exactly at the right output pixels: (j+0.5)/f - 0.5 = i.
    out = resample_slice(img, (3.0, 5.0))
    np.testing.assert_allclose(out[1::3, 2::5], img, atol=1e-5)


def test_blob_centroid_lands_at_same_world_position():
    aff = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.15, 0.12, 0.15])
    aff[:3, 3] = [3.0, -2.0, 1.0]
    yy, xx = np.mgrid[0:40, 0:36]
    blob = np.exp(-((yy - 17.3) ** 2 + (xx - 20.6) ** 2) / (2 * 3.0 ** 2)).astype(np.float32)
    factors = (0.15 / 0.018, 0.12 / 0.03)
    out = resample_slice(blob, factors)

    def centroid(img):
        w = np.clip(img, 0, None)
        gy, gx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
        return np.array([(w * gy).sum() / w.sum(), (w * gx).sum() / w.sum(), 0.0])

    world_lr = nib.affines.apply_affine(aff, centroid(blob))
    world_hr = nib.affines.apply_affine(resampled_affine(aff, -1, factors), centroid(out))
    np.testing.assert_allclose(world_hr, world_lr, atol=2e-3)
    # An off-by-half-voxel grid would miss by (1 - 1/f) / 2 output voxels, far beyond the tolerance.
    assert 0.5 * 0.15 * (1 - 1 / factors[0]) > 20 * 2e-3


# ---------------------------------------------------------------- ROI


def test_otsu_separates_a_bimodal_image(rng):
    bone = rng.random((64, 64)) < 0.3
    img = np.where(bone, rng.normal(1000, 80, (64, 64)), rng.normal(50, 30, (64, 64)))
    thr = otsu_threshold(img)
    assert 50 + 3 * 30 < thr < 1000 - 3 * 80  # in the gap between the two modes
    mask = foreground_mask(img, thr)
    assert mask.dtype == bool
    assert (mask != bone).mean() < 0.005
    assert otsu_threshold(np.full(10, 7.0)) == 7.0
    with pytest.raises(ValueError):
        otsu_threshold(np.array([]))


def test_roi_bbox_grows_by_margin_and_clips_to_the_slice():
    img = np.zeros((50, 60), np.float32)
    img[10:20, 30:45] = 100.0
    img[15, 5] = 100.0
    assert roi_bbox(img, 50.0, 0) == (slice(10, 20), slice(5, 45))
    assert roi_bbox(img, 50.0, 4) == (slice(6, 24), slice(1, 49))
    assert roi_bbox(img, 50.0, 100) == (slice(0, 50), slice(0, 60))
    assert roi_bbox(img, 100.0, 3) is None  # strictly above the threshold
    assert roi_bbox(np.zeros((8, 8)), 0.5, 2) is None


# ---------------------------------------------------------------- intensity statistics


def test_normalize_range_round_trip_and_variance_scale(rng):
    stats = IntensityStats(mean=1200.0, std=300.0, low=-2.5, high=2.5)
    x = rng.normal(1200, 600, size=(32, 32))
    u = stats.normalize(x)
    assert u.dtype == np.float32 and u.min() == 0.0 and u.max() == 1.0
    inside = (x > 1200 - 2.5 * 300) & (x < 1200 + 2.5 * 300)
    np.testing.assert_allclose(stats.denormalize(u)[inside], x[inside], rtol=1e-5, atol=1e-2)
    assert stats.denormalize(np.float32(0.0)) == pytest.approx(1200 - 750)
    assert stats.denormalize(np.float32(1.0)) == pytest.approx(1200 + 750)
    # A small spread in u maps back linearly: var_x = var_u * scale**2.
    du = 1e-3 * rng.normal(size=10000) + 0.5
    assert stats.denormalize(du).var() == pytest.approx(du.var() * stats.scale ** 2, rel=1e-3)
    assert IntensityStats.from_dict(stats.to_dict()) == stats
    assert stats.to_dict() == {"mean": 1200.0, "std": 300.0, "low": -2.5, "high": 2.5}


def test_intensity_stats_refuse_degenerate_values():
    with pytest.raises(ValueError):
        IntensityStats(0.0, 0.0, -1.0, 1.0)
    with pytest.raises(ValueError):
        IntensityStats(0.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        IntensityStats(float("nan"), 1.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="lack high"):
        IntensityStats.from_dict({"mean": 0.0, "std": 1.0, "low": -1.0})


def make_phantom(rng, fg_mean, fg_std, shape=(48, 40, 24)):
    """Background near 0 with a box of tissue ~ N(fg_mean, fg_std)."""
    data = rng.normal(0.0, 5.0, size=shape)
    box = (slice(10, 38), slice(8, 32), slice(None))
    data[box] = rng.normal(fg_mean, fg_std, size=data[box].shape)
    return data.astype(np.float32)


def test_volume_stats_describe_the_foreground(tmp_path, rng):
    vol = open_volume(save(tmp_path / "p.nii.gz", make_phantom(rng, 1000.0, 100.0)))
    thr = volume_threshold(vol)
    assert 3 * 5.0 < thr < 1000.0 - 3 * 100.0  # between background and tissue
    exact = volume_stats(vol, threshold=500.0, max_slices=8)
    assert exact.mean == pytest.approx(1000.0, abs=5.0)
    assert exact.std == pytest.approx(100.0, rel=0.03)
    # [0, 1] spans the scan's low end (background ~0: z = -10) to the foreground's 99.5th percentile
    assert exact.low == pytest.approx(-10.0, abs=0.3) and exact.high == pytest.approx(2.576, abs=0.15)
    # Otsu sits at the upper edge of the background noise; a few noise voxels widen the std a little.
    stats = volume_stats(vol, max_slices=8)
    assert stats.mean == pytest.approx(1000.0, abs=10.0) and stats.std == pytest.approx(100.0, rel=0.1)
    u = stats.normalize(vol.read_slice(5))
    assert 0.0 <= u.min() and u.max() <= 1.0
    # foreground median at z = 0, i.e. (0 - low) / (high - low) ~ 10 / 12.6; background near 0, not clipped away
    assert 0.74 < float(np.median(u[10:38, 8:32])) < 0.84
    assert float(np.median(u[:5])) < 0.02 and float(u[:5].max()) < 0.1
    across = volume_stats(vol, threshold=500.0, axis=0, max_slices=6)
    assert across.mean == pytest.approx(1000.0, abs=10.0) and across.std == pytest.approx(100.0, rel=0.05)
    # With factors the statistics are those of the resampled slices (4 of 24: k = 0, 8, 15, 23).
    resampled = volume_stats(vol, threshold=500.0, factors=(2.0, 3.0), max_slices=4)
    values = np.concatenate([resample_slice(vol.read_slice(k), (2.0, 3.0)).ravel() for k in (0, 8, 15, 23)])
    fg = values[values > 500.0].astype(np.float64)
    assert resampled.mean == pytest.approx(fg.mean(), rel=1e-9) and resampled.std == pytest.approx(fg.std(), rel=1e-9)


def test_volume_stats_refuse_a_volume_without_foreground(tmp_path):
    path = save(tmp_path / "flat.nii", np.full((8, 8, 4), 3.0, np.float32))
    with pytest.raises(InputError) as exc:
        volume_stats(open_volume(path))
    assert str(exc.value).startswith(f"{path}: ") and "\n" not in str(exc.value)


def test_combine_stats_pools_volumes():
    a = IntensityStats(1000.0, 100.0, -2.0, 2.0)
    assert combine_stats([a, a]).to_dict() == pytest.approx(a.to_dict())
    b = IntensityStats(1200.0, 100.0, -2.0, 2.0)
    both = combine_stats([a, b])
    assert both.mean == pytest.approx(1100.0)
    assert both.std == pytest.approx(np.sqrt(100.0 ** 2 + 100.0 ** 2))
    # The physical range [low, high] is the average of the two: [900, 1300].
    assert both.denormalize(np.float32(0.0)) == pytest.approx(900.0, rel=1e-6)
    assert both.denormalize(np.float32(1.0)) == pytest.approx(1300.0, rel=1e-6)
    with pytest.raises(ValueError):
        combine_stats([])
