"""Training and prediction must show the network the same intensities for the same LR slice.

The training pipeline normalises each LR volume with its own foreground statistics (threshold drawn on
the native voxels, or ``data.roi_threshold_lr``); ``predict`` must rebuild exactly those statistics from
the model's metadata, or the network sees other intensities than it learned on.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from microsr_tf.config import Config
from microsr_tf.inference.predict import input_stats
from microsr_tf.pipeline import make_training_data
from microsr_tf.preprocessing import resample_slice
from microsr_tf.training.trainer import generator_meta
from microsr_tf.volumes import open_volume

LR_SPACING, HR_SPACING = 0.4, 0.1


def _write(path: Path, data: np.ndarray, spacing: float) -> None:
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([spacing, spacing, 0.1, 1.0]))
    nib.save(img, path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """LR volumes whose Otsu threshold differs between native and resampled voxels (skewed, blurred edges)."""
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("parity")
    (root / "lr").mkdir()
    (root / "hr").mkdir()
    yy, xx = np.mgrid[:24, :24].astype(np.float32)
    for v in range(2):
        vol = rng.normal(-900.0, 30.0, (24, 24, 6))
        for k in range(6):
            r = np.hypot(yy - 11 - v, xx - 12 + k % 3)
            vol[..., k] += np.where(r < 7, 1300.0 + 400.0 * (r < 3), 0.0)
        _write(root / "lr" / f"lr{v}.nii.gz", vol, LR_SPACING)
    for v in range(2):
        hr = rng.normal(100.0, 5.0, (96, 96, 6))
        hr[20:70, 25:75] += 900.0
        _write(root / "hr" / f"hr{v}.nii.gz", hr, HR_SPACING)
    return root / "lr", root / "hr"


def _normalised_crops(data, meta, normalize="volume"):
    """Pairs (pipeline patch, predict-path array at the same place) for every indexed LR slice."""
    dom = data._lr_source.domain
    for s in range(len(dom.slice_ks)):
        path = dom.paths[int(dom.vol_ids[s])]
        vol = open_volume(path)
        stats = input_stats(vol, dom.axis % 3, dom.factors, meta, normalize)
        up = stats.normalize(resample_slice(vol.read_slice(int(dom.slice_ks[s]), axis=dom.axis), dom.factors))
        r0, r1, c0, c1 = (int(v) for v in dom.boxes[s])
        crop = up[r0:r1, c0:c1]
        patches = dom.slice_patches(s)[..., 0]
        origins = dom.origins[dom.offsets[s]:dom.offsets[s + 1]]
        for patch, (i, j) in zip(patches, origins):
            yield patch, crop[i:i + dom.patch, j:j + dom.patch]


@pytest.mark.parametrize("threshold", [None, -400.0])
def test_predict_normalises_an_lr_slice_exactly_as_training_did(folders, threshold):
    cfg = Config().override({"data": {"patch_size": 32, "stride": 16, "min_foreground": 0.05,
                                      "roi_threshold_lr": threshold}})
    data = make_training_data(*folders, cfg.data, n_val=1)
    meta = generator_meta(cfg, data)
    pairs = list(_normalised_crops(data, meta))
    assert len(pairs) > 4
    for train_patch, predict_patch in pairs:
        np.testing.assert_allclose(predict_patch, train_patch, atol=1e-6)


def test_the_threshold_matters_so_the_parity_test_can_fail(folders):
    """Otsu on resampled voxels (the old prediction path) gives other statistics than training's."""
    from microsr_tf.preprocessing import otsu_threshold, sample_voxels, volume_threshold

    cfg = Config().override({"data": {"patch_size": 32, "stride": 16, "min_foreground": 0.05}})
    data = make_training_data(*folders, cfg.data, n_val=1)
    vol = open_volume(data.lr_files[0])
    native = volume_threshold(vol)
    resampled = otsu_threshold(sample_voxels(vol, factors=data.factors))
    assert abs(native - resampled) > 1.0


def test_model_statistics_are_the_pooled_training_statistics(folders):
    cfg = Config().override({"data": {"patch_size": 32, "stride": 16, "min_foreground": 0.05}})
    data = make_training_data(*folders, cfg.data, n_val=1)
    meta = generator_meta(cfg, data)
    stats = input_stats(open_volume(data.lr_files[0]), 2, data.factors, meta, "model")
    per_volume = data._lr_source.domain.stats
    assert stats.mean == pytest.approx(np.mean([s.mean for s in per_volume]))
