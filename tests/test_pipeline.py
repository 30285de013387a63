"""The unpaired LR/HR tf.data pipeline on real (tiny) NIfTI folders, and its TFRecord shards."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from skimage.filters import threshold_otsu

from microsr_tf.config import DataConfig
from microsr_tf.errors import InputError
from microsr_tf.pipeline import make_hr_patches, make_training_data, prepare_shards, read_shard_index

HR_SPACING = 0.1
LR_FACTOR = 4
PATCH = 32


def write_nifti(path: Path, data: np.ndarray, spacing: float) -> Path:
    img = nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0]))
    img.header.set_zooms((spacing,) * 3)
    nib.save(img, path)
    return path


STRUCTURE = 0.25  # normalised: blob_volume's background (~50) lies below 0.05, its discs and rings above 0.5


def blob_volume(rng: np.random.Generator, size: int, n_slices: int, radius: float) -> np.ndarray:
    """Bright discs and rings (bone-like, ~1000) on a dark noisy background (~50); slice 0 is empty."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    vol = rng.normal(50.0, 5.0, (size, size, n_slices)).astype(np.float32)
    for k in range(1, n_slices):
        for _ in range(3):
            cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
            r = np.hypot(yy - cy, xx - cx)
            disc, ring = r < radius, np.abs(r - 1.6 * radius) < 0.3 * radius
            vol[..., k][disc] = rng.normal(1000.0, 40.0, disc.sum())
            vol[..., k][ring] = rng.normal(700.0, 40.0, ring.sum())
    return vol


def stripe_volume(rng: np.random.Generator, size: int, n_slices: int) -> np.ndarray:
    """Vertical stripes, two pixels bright and two dark (period 4 px), filling every slice."""
    stripes = np.where((np.arange(size) // 2) % 2 == 0, 1000.0, 50.0).astype(np.float32)
    return (stripes[None, :, None] + rng.normal(0, 5, (size, size, n_slices))).astype(np.float32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two LR volumes (20x20 px at 0.4 mm -> 80x80 at 0.1 mm) and two HR volumes (80x80 px at 0.1 mm)."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("data")
    lr, hr = root / "lr", root / "hr"
    lr.mkdir()
    hr.mkdir()
    for i in range(2):
        write_nifti(lr / f"lr{i}.nii.gz", blob_volume(rng, 20, 6, 2.5), HR_SPACING * LR_FACTOR)
        write_nifti(hr / f"hr{i}.nii.gz", blob_volume(rng, 80, 6, 10.0), HR_SPACING)
    return lr, hr


def config(**kw) -> DataConfig:
    base = dict(patch_size=PATCH, stride=16, roi_margin=4, min_foreground=0.1, shuffle_buffer=64, seed=3)
    base.update(kw)
    return DataConfig(**base)


def first_batches(ds: tf.data.Dataset, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(lr.numpy(), hr.numpy()) for lr, hr in ds.take(n)]


def test_training_data_shapes_dtype_range(folders):
    lr_dir, hr_dir = folders
    data = make_training_data(lr_dir, hr_dir, config(), n_val=3)
    assert data.lr_files == sorted(lr_dir.glob("*.nii.gz")) and len(data.hr_files) == 2
    assert data.lr_spacing == pytest.approx((0.4, 0.4)) and data.hr_spacing == pytest.approx((0.1, 0.1))
    assert data.factors == pytest.approx((4.0, 4.0))
    assert data.n_lr_patches > 10 and data.n_hr_patches > 10
    assert data.steps_per_epoch(4) == min(data.n_lr_patches, data.n_hr_patches) // 4
    assert data.steps_per_epoch(10 ** 6) == 1
    # the HR reference statistics from their definition, on every voxel: Otsu foreground, its mean and
    # std; low = the 0.5th percentile of all voxels (air), high = the 99.5th of the foreground, as
    # z-values; two volumes pooled with equal weight
    per_volume = []
    for path in data.hr_files:
        voxels = nib.load(path).get_fdata().ravel()
        fg = voxels[voxels > threshold_otsu(voxels)]
        low = np.percentile((voxels - fg.mean()) / fg.std(), 0.5)
        high = np.percentile((fg - fg.mean()) / fg.std(), 99.5)
        per_volume.append((fg.mean(), fg.std(), fg.mean() + low * fg.std(), fg.mean() + high * fg.std()))
    means, stds, lows, highs = np.array(per_volume).T
    mean = means.mean()
    std = np.sqrt(np.mean(stds ** 2 + (means - mean) ** 2))
    expected = (mean, std, (lows.mean() - mean) / std, (highs.mean() - mean) / std)
    got = data.hr_stats
    np.testing.assert_allclose((got.mean, got.std, got.low, got.high), expected, rtol=1e-6)
    for val in (data.val_lr, data.val_hr):
        assert val.shape == (3, PATCH, PATCH, 1) and val.dtype == np.float32
        assert 0.0 <= val.min() and val.max() <= 1.0 and val.max() > 0.5

    ds = data.dataset(4)
    assert ds.element_spec[0].shape == (4, PATCH, PATCH, 1) and ds.element_spec[0].dtype == tf.float32
    assert ds.element_spec[1].shape == (4, PATCH, PATCH, 1)
    batches = first_batches(ds, 2 * data.steps_per_epoch(4) + 1)  # runs past one epoch: the stream repeats
    for lr, hr in batches:
        assert lr.dtype == np.float32 and lr.shape == (4, PATCH, PATCH, 1) and hr.shape == (4, PATCH, PATCH, 1)
        assert 0.0 <= lr.min() and lr.max() <= 1.0 and 0.0 <= hr.min() and hr.max() <= 1.0
    # foreground filter (10%): the background normalises near 0 (< 0.05), structure above 0.5
    for domain in (0, 1):
        patches = np.concatenate([b[domain] for b in batches])
        assert ((patches > STRUCTURE).mean(axis=(1, 2, 3)) >= 0.05).all()


def test_background_patches_are_rejected(folders):
    """A wide ROI margin lets background patches into the grid; the foreground filter drops them."""
    lr_dir, hr_dir = folders
    everything = make_training_data(lr_dir, hr_dir, config(min_foreground=0.0, roi_margin=40), n_val=1)
    filtered = make_training_data(lr_dir, hr_dir, config(min_foreground=0.1, roi_margin=40), n_val=1)
    assert filtered.n_hr_patches < everything.n_hr_patches
    assert filtered.n_lr_patches < everything.n_lr_patches
    for data, n in ((everything, everything.n_hr_patches), (filtered, filtered.n_hr_patches)):
        hr = np.concatenate([b[1] for b in data.dataset(n).take(1)])
        fractions = (hr > STRUCTURE).mean(axis=(1, 2, 3))
        assert (fractions.min() >= 0.05) == (data is filtered)


def test_same_seed_same_batches_other_seed_different(folders):
    lr_dir, hr_dir = folders
    a = first_batches(make_training_data(lr_dir, hr_dir, config(seed=11)).dataset(4), 3)
    b = first_batches(make_training_data(lr_dir, hr_dir, config(seed=11)).dataset(4), 3)
    c = first_batches(make_training_data(lr_dir, hr_dir, config(seed=12)).dataset(4), 3)
    for (lr_a, hr_a), (lr_b, hr_b) in zip(a, b):
        np.testing.assert_array_equal(lr_a, lr_b)
        np.testing.assert_array_equal(hr_a, hr_b)
    assert not all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_lr_patches_are_resampled_to_the_hr_spacing(tmp_path):
    """Stripes 4 LR px apart must repeat every 16 px in the patches: one pixel = the HR spacing."""
    rng = np.random.default_rng(0)
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir()
    hr.mkdir()
    write_nifti(lr / "stripes.nii", stripe_volume(rng, 16, 3), HR_SPACING * LR_FACTOR)
    write_nifti(hr / "blobs.nii", blob_volume(rng, 64, 3, 8.0), HR_SPACING)
    data = make_training_data(lr, hr, config(shuffle_buffer=1), n_val=2)
    assert data.n_lr_patches > 0  # a 16 px LR slice only holds 32 px patches once resampled (64 px)
    lr_patches = np.concatenate([b[0] for b in first_batches(data.dataset(2), 4)])[..., 0]
    spectrum = np.abs(np.fft.rfft(lr_patches - lr_patches.mean(axis=2, keepdims=True), axis=2)).mean(axis=(0, 1))
    assert int(np.argmax(spectrum)) == PATCH // (4 * LR_FACTOR)  # 2 cycles per 32 px patch


def test_mirrored_strategy_per_replica_batches(folders, two_cpus):
    lr_dir, hr_dir = folders
    data = make_training_data(lr_dir, hr_dir, config(), n_val=1)
    strategy = tf.distribute.MirroredStrategy(two_cpus)
    dist = strategy.distribute_datasets_from_function(lambda ctx: data.dataset(4, ctx))
    lr, hr = next(iter(dist))
    for value in (lr, hr):
        parts = strategy.experimental_local_results(value)
        assert len(parts) == 2
        assert all(tuple(p.shape) == (2, PATCH, PATCH, 1) for p in parts)

    @tf.function
    def step(lr, hr):
        return strategy.run(lambda a, b: tf.reduce_mean(a) + tf.reduce_mean(b), args=(lr, hr))

    assert all(np.isfinite(v.numpy()) for v in strategy.experimental_local_results(step(lr, hr)))


def assert_one_line_naming(exc: pytest.ExceptionInfo, name: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and name in message, message


def test_bad_folders_are_refused(folders, tmp_path):
    lr_dir, hr_dir = folders
    with pytest.raises(InputError) as exc:
        make_training_data(tmp_path / "missing", hr_dir, config())
    assert_one_line_naming(exc, "missing")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError) as exc:
        make_training_data(lr_dir, empty, config())
    assert_one_line_naming(exc, "empty")

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a volume")
    with pytest.raises(InputError) as exc:
        make_training_data(notes, hr_dir, config())
    assert_one_line_naming(exc, "notes")


def test_inconsistent_spacing_is_refused(folders, tmp_path):
    _, hr_dir = folders
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rng = np.random.default_rng(1)
    write_nifti(mixed / "a.nii", blob_volume(rng, 20, 3, 2.5), 0.4)
    write_nifti(mixed / "b.nii", blob_volume(rng, 20, 3, 2.5), 0.41)  # 2.5% apart
    with pytest.raises(InputError) as exc:
        make_training_data(mixed, hr_dir, config())
    assert_one_line_naming(exc, "b.nii")
    assert "spacing" in str(exc.value)


def test_lr_not_coarser_is_refused(folders):
    lr_dir, hr_dir = folders
    with pytest.raises(InputError) as exc:
        make_training_data(hr_dir, lr_dir, config())
    assert_one_line_naming(exc, str(hr_dir))
    assert "coarser" in str(exc.value)


def test_a_volume_whose_slices_are_smaller_than_the_patch_is_refused_by_name(folders):
    lr_dir, hr_dir = folders
    with pytest.raises(InputError) as exc:
        make_training_data(lr_dir, hr_dir, config(patch_size=128, stride=64))
    assert_one_line_naming(exc, str(lr_dir))
    assert "smaller than the 128 px patches" in str(exc.value)


def test_no_foreground_patch_is_refused(folders):
    lr_dir, hr_dir = folders
    with pytest.raises(InputError) as exc:
        make_training_data(lr_dir, hr_dir, config(min_foreground=1.0))
    assert_one_line_naming(exc, str(lr_dir))
    assert "foreground" in str(exc.value)


def test_prepare_round_trip_matches_the_nifti_stream(folders, tmp_path):
    lr_dir, hr_dir = folders
    cfg = config(shuffle_buffer=1)
    nifti = make_training_data(lr_dir, hr_dir, cfg, n_val=3)
    out = prepare_shards(lr_dir, hr_dir, tmp_path / "shards", cfg, shard_bytes=PATCH * PATCH * 2 * 10)
    index = read_shard_index(out)
    assert index["counts"] == {"lr": nifti.n_lr_patches, "hr": nifti.n_hr_patches}
    assert len(index["shards"]["lr"]) == -(-nifti.n_lr_patches // 10)  # ~10 uint16 patches per shard
    assert sum(e["count"] for e in index["shards"]["hr"]) == nifti.n_hr_patches
    assert index["data_config"]["patch_size"] == PATCH and index["dtype"] == "uint16"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    shards = make_training_data(None, None, dataclasses.replace(cfg, shards_dir=str(out)), n_val=3)
    for field in ("lr_files", "hr_files", "n_lr_patches", "n_hr_patches", "hr_stats"):
        assert getattr(shards, field) == getattr(nifti, field), field
    assert shards.factors == pytest.approx(nifti.factors) and shards.hr_spacing == pytest.approx(nifti.hr_spacing)
    np.testing.assert_allclose(shards.val_lr, nifti.val_lr, atol=1 / 65535)
    np.testing.assert_allclose(shards.val_hr, nifti.val_hr, atol=1 / 65535)

    # every shard file together holds exactly the NIfTI stream's patch multiset
    for domain, n in (("lr", nifti.n_lr_patches), ("hr", nifti.n_hr_patches)):
        files = [str(out / e["file"]) for e in index["shards"][domain]]
        stored = np.sort([float(np.frombuffer(r.numpy(), "<u2").astype(np.float64).sum() / 65535)
                          for r in tf.data.TFRecordDataset(files)])
        streamed = np.sort([float(b[("lr", "hr").index(domain)].numpy().sum())
                            for b in nifti.dataset(1).take(n)])
        np.testing.assert_allclose(stored, streamed, atol=PATCH * PATCH / 65535)

    lr, hr = next(iter(shards.dataset(4)))
    assert lr.shape == (4, PATCH, PATCH, 1) and hr.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(lr)) and float(tf.reduce_max(hr)) <= 1.0


def test_single_shard_stream_is_one_epoch_of_patches(folders, tmp_path):
    lr_dir, hr_dir = folders
    cfg = config(shuffle_buffer=1)
    nifti = make_training_data(lr_dir, hr_dir, cfg, n_val=1)
    out = prepare_shards(lr_dir, hr_dir, tmp_path / "shards", cfg, dtype="float32")
    shards = make_training_data(None, None, dataclasses.replace(cfg, shards_dir=str(out)), n_val=1)
    for domain, n in ((0, nifti.n_lr_patches), (1, nifti.n_hr_patches)):
        a = np.sort([float(b[domain].numpy().sum()) for b in nifti.dataset(1).take(n)])
        b = np.sort([float(b[domain].numpy().sum()) for b in shards.dataset(1).take(n)])
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_shards_refuse_other_patch_size_and_bad_folders(folders, tmp_path):
    lr_dir, hr_dir = folders
    out = prepare_shards(lr_dir, hr_dir, tmp_path / "shards", config())
    with pytest.raises(InputError) as exc:
        make_training_data(None, None, config(patch_size=64, stride=32, shards_dir=str(out)))
    assert_one_line_naming(exc, "index.json")
    assert "prepared with data.patch_size 32 but it is 64 here" in str(exc.value)
    for other, needle in [(dict(stride=8), "data.stride 16 but it is 8"),
                          (dict(roi_threshold_lr=0.5), "data.roi_threshold_lr None but it is 0.5")]:
        for make in (make_training_data, make_hr_patches):  # the run would record settings its patches lack
            with pytest.raises(InputError) as exc:
                make(None, None, config(shards_dir=str(out), **other))
            assert_one_line_naming(exc, "index.json")
            assert needle in str(exc.value)
    assert make_training_data(None, None, config(shards_dir=str(out), seed=9, shuffle_buffer=8)).n_lr_patches > 0
    with pytest.raises(InputError) as exc:
        make_training_data(None, None, config(shards_dir=str(lr_dir)))
    assert_one_line_naming(exc, str(lr_dir))
    with pytest.raises(InputError) as exc:
        prepare_shards(lr_dir, hr_dir, out, config())
    assert_one_line_naming(exc, str(out))
    (out / json.loads((out / "index.json").read_text())["shards"]["hr"][0]["file"]).unlink()
    with pytest.raises(InputError) as exc:
        make_training_data(None, None, config(shards_dir=str(out)))
    assert_one_line_naming(exc, "hr-00000")
    hr_copy = tmp_path / "hr_copy"  # shards inside a data folder would be read as part of it next time
    hr_copy.mkdir()
    for f in sorted(Path(hr_dir).iterdir()):
        os.symlink(f, hr_copy / f.name)
    with pytest.raises(InputError) as exc:
        prepare_shards(lr_dir, hr_copy, hr_copy / "shards", config())
    assert_one_line_naming(exc, str(hr_copy / "shards"))
    assert "inside the data folder" in str(exc.value) and sorted(hr_copy.iterdir()) == sorted(
        hr_copy / f.name for f in Path(hr_dir).iterdir())


def test_cli_prepare(folders, tmp_path):
    from microsr_tf.cli.main import cli

    lr_dir, hr_dir = folders
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text("data:\n  patch_size: 64\n  stride: 16\n  roi_margin: 4\n")
    out = tmp_path / "shards"
    runner = CliRunner()
    result = runner.invoke(cli, ["prepare", "--lr-dir", str(lr_dir), "--hr-dir", str(hr_dir), "--out", str(out),
                                 "--config", str(yaml_path), "--patch-size", str(PATCH)])
    assert result.exit_code == 0, result.output
    index = read_shard_index(out)
    assert index["patch_size"] == PATCH  # the flag overrides the YAML
    assert index["data_config"]["roi_margin"] == 4 and index["data_config"]["stride"] == 16
    assert f"{index['counts']['lr']} LR" in result.output

    result = runner.invoke(cli, ["prepare", "--lr-dir", str(tmp_path / "nope"), "--hr-dir", str(hr_dir),
                                 "--out", str(tmp_path / "other"), "--patch-size", str(PATCH)])
    assert result.exit_code != 0
    assert "nope" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()
