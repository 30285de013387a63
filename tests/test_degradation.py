"""Synthetic training pairs of the supervised baselines: the paper's degradation checked against
hand computations, and the paired stream read from the HR folder only."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from microsr_tf.config import DataConfig
from microsr_tf.degradation import Degradation, make_paired_data
from microsr_tf.errors import InputError
from microsr_tf.pipeline import make_training_data, prepare_shards

SEED = tf.constant([7, 11], tf.int64)


def keys(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, written out from Keys (1981), eq. 15."""
    t = np.abs(t)
    return np.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1,
                    np.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0.0))


def test_constant_and_linear_ramp_come_back_unchanged():
    """A normalised symmetric kernel keeps constants and ramps; Keys' cubic reproduces ramps."""
    p = 128
    yy, xx = np.mgrid[:p, :p].astype(np.float32)
    ramp = (0.2 + 0.002 * yy + 0.003 * xx)[None, ..., None]
    constant = np.full((1, p, p, 1), 0.37, np.float32)
    degrade = Degradation((8.0, 8.0), 0.0)
    np.testing.assert_allclose(degrade(constant, SEED).numpy(), constant, atol=1e-6)
    # Interior only: within two LR pixels of the patch border the kernels are cut off.
    out = degrade(ramp, SEED).numpy()
    np.testing.assert_allclose(out[0, 48:80, 48:80], ramp[0, 48:80, 48:80], atol=1e-5)


def test_downsampling_is_anti_aliased():
    """A 4 px period is above the LR Nyquist limit (16 px at f = 8): the anti-aliased LR grid removes
    it, where sampling at the LR pixel centres would read a large false offset."""
    p, f = 128, 8
    xx = np.mgrid[:p, :p][1].astype(np.float32)
    sine = (0.5 + 0.4 * np.sin(2 * np.pi * xx / 4 + 0.3))[None, ..., None]
    centres = (np.arange(p // f) + 0.5) * f - 0.5  # HR positions of the LR pixel centres
    point_sampled = 0.5 + 0.4 * np.sin(2 * np.pi * centres / 4 + 0.3)
    assert np.abs(point_sampled - 0.5).min() > 0.15
    lr = Degradation((f, f), 0.0).downsample(sine).numpy()
    assert lr.shape == (1, 16, 16, 1)
    assert np.abs(lr - 0.5).max() < 0.05  # at most an eighth of the 0.4 amplitude leaks through


def test_noise_has_the_configured_std_on_the_lr_grid_and_is_interpolated_by_keys():
    sigma, f, p = 0.05, 4, 64
    degrade = Degradation((f, f), sigma)
    hr = np.full((64, p, p, 1), 0.5, np.float32)
    lr_noise = degrade.add_noise(degrade.downsample(hr), SEED).numpy() - 0.5
    assert lr_noise.std() == pytest.approx(sigma, rel=0.03)
    assert abs(lr_noise.mean()) < 3 * sigma / np.sqrt(lr_noise.size)

    # Each HR pixel is a Keys-weighted sum of independent LR noise values: its variance is
    # sigma^2 * sum(w_rows^2) * sum(w_cols^2), with weights at the distances to the 4 nearest LR pixels.
    out = degrade(hr, SEED).numpy()[..., 0] - 0.5
    j = np.arange(16, 48)  # interior: all four taps inside the LR grid
    pos = (j + 0.5) / f - 0.5
    taps = np.floor(pos)[:, None] + np.arange(-1, 3)[None, :]
    energy = (keys(pos[:, None] - taps) ** 2).sum(axis=1)
    expected = sigma**2 * np.outer(energy, energy)
    measured = out[:, 16:48, 16:48].var(axis=0)
    assert measured.mean() == pytest.approx(expected.mean(), rel=0.05)
    # The variance follows the pixel phase (position inside its LR pixel): pooled per phase, each of
    # the 4 x 4 phases matches its own prediction.
    by_phase = lambda a: a.reshape(8, f, 8, f).mean(axis=(0, 2))  # noqa: E731
    np.testing.assert_allclose(by_phase(measured), by_phase(expected), rtol=0.1)
    assert by_phase(expected).max() > 1.3 * by_phase(expected).min()  # the phases do differ


def test_seeded_noise_repeats_and_different_seeds_differ():
    degrade = Degradation((4.0, 4.0), 0.05)
    hr = np.full((2, 32, 32, 1), 0.5, np.float32)
    a, b = degrade(hr, SEED).numpy(), degrade(hr, SEED).numpy()
    c = degrade(hr, tf.constant([7, 12], tf.int64)).numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_lr_grid_of_non_integer_factors_has_whole_pixels():
    degrade = Degradation((8.33, 6.0), 0.0)
    assert degrade.lr_shape((64, 64)) == (8, 11)
    assert degrade.lr_shape((256, 256)) == (31, 43)
    out = degrade(np.random.default_rng(0).random((1, 64, 64, 1), dtype=np.float32), SEED)
    assert out.shape == (1, 64, 64, 1)


def _disk(n: int, spacing: float, seed: int, nan: bool = False) -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] / n
    r2 = (yy - 0.5) ** 2 + (xx - 0.5) ** 2
    img = np.stack([1000.0 * (r2 < 0.12) + 300.0 * (r2 < 0.03) + rng.normal(0, 20, (n, n)) for _ in range(3)], -1)
    if nan:
        img[:] = np.nan
    return nib.Nifti1Image(img.astype(np.float32), np.diag([spacing, spacing, 0.5, 1.0]))


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """An LR folder whose voxels are all NaN (unreadable as data, fine as a spacing) and an HR folder."""
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir()
    hr.mkdir()
    nib.save(_disk(16, 0.4, 0, nan=True), lr / "case0.nii.gz")
    nib.save(_disk(64, 0.1, 1), hr / "case0.nii.gz")
    return lr, hr


def test_paired_stream_reads_the_lr_folder_for_its_spacing_only(folders):
    cfg = DataConfig(patch_size=32, stride=16, seed=3)
    with pytest.raises(InputError, match="NaN"):
        make_training_data(*folders, cfg)  # the unpaired stream reads LR voxels
    data = make_paired_data(*folders, cfg, n_val=2)
    assert data.factors == pytest.approx((4.0, 4.0)) and data.lr_spacing == pytest.approx((0.4, 0.4))
    assert data.val_lr.shape == data.val_hr.shape == (2, 32, 32, 1)

    first = [tuple(t.numpy() for t in batch) for batch in data.dataset(4).take(3)]
    again = [tuple(t.numpy() for t in batch) for batch in data.dataset(4).take(3)]
    for (lr, hr), (lr2, hr2) in zip(first, again):
        assert lr.shape == hr.shape == (4, 32, 32, 1)
        assert np.array_equal(lr, lr2) and np.array_equal(hr, hr2)  # data.seed makes the pairs repeat
        assert 0.0 <= lr.min() and lr.max() <= 1.0
        # the input is the blurred, noisy version of its own target, not another patch
        noise_free = Degradation(data.factors, 0.0)(hr, SEED).numpy()
        assert np.abs(lr - noise_free).mean() < 0.06 < np.abs(lr - hr).max()
    assert not np.array_equal(first[0][0], first[1][0])


def test_paired_stream_from_shards_uses_the_hr_patches(tmp_path):
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir()
    hr.mkdir()
    nib.save(_disk(16, 0.4, 0), lr / "case0.nii.gz")
    nib.save(_disk(64, 0.1, 1), hr / "case0.nii.gz")
    cfg = DataConfig(patch_size=32, stride=16, seed=3)
    prepare_shards(lr, hr, tmp_path / "shards", cfg, dtype="float32")
    from_folders = make_paired_data(lr, hr, cfg, n_val=2)
    from_shards = make_paired_data(None, None, DataConfig(patch_size=32, stride=16, seed=3,
                                                          shards_dir=str(tmp_path / "shards")), n_val=2)
    assert from_shards.factors == pytest.approx(from_folders.factors)
    assert from_shards.steps_per_epoch(2) == from_folders.steps_per_epoch(2)
    np.testing.assert_allclose(from_shards.val_hr, from_folders.val_hr, atol=1e-6)
    np.testing.assert_allclose(from_shards.val_lr, from_folders.val_lr, atol=1e-5)
    lr_batch, hr_batch = next(iter(from_shards.dataset(2)))
    assert lr_batch.shape == hr_batch.shape == (2, 32, 32, 1)
