"""Whole-volume prediction: NIfTI in, posterior mean/variance NIfTI out, on a tiny real generator."""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from microsr_tf.cli.main import cli
from microsr_tf.errors import ConfigError, InputError
from microsr_tf.inference.predict import predict_volume, slice_seed
from microsr_tf.models.artifact import save_generator
from microsr_tf.models.generator import ResnetGenerator
from microsr_tf.preprocessing import IntensityStats

from processes import signal_when, sigkill_when  # tests/processes.py

HR_SPACING = 0.1
FACTOR = 4
HR_STATS = IntensityStats(mean=2000.0, std=500.0, low=-3.0, high=3.0)  # [0, 1] -> [500, 3500]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A training-run-like directory holding a tiny untrained generator and its metadata."""
    run = tmp_path_factory.mktemp("run")
    gen = ResnetGenerator(ngf=4, n_blocks=1)
    gen(np.zeros((1, 32, 32, 1), np.float32))
    meta = {
        "format": 1, "hr_spacing": [HR_SPACING, HR_SPACING], "lr_spacing": [0.4, 0.4],
        "factors": [float(FACTOR), float(FACTOR)], "hr_stats": HR_STATS.to_dict(),
        "model": {"ngf": 4, "n_blocks": 1}, "patch_size": 32, "axis": -1,
    }
    save_generator(gen, run / "generator.keras", meta)
    return run


@pytest.fixture(scope="module")
def model(model_dir):
    from microsr_tf.models.artifact import load_generator

    return load_generator(model_dir)


def rotated_affine(zooms, origin=(10.0, -20.0, 5.0), angle=0.5):
    """A rotated, translated affine with the given voxel sizes (exercises the full 4x4, not just zooms)."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(zooms)
    aff[:3, 3] = origin
    return aff


def write_lr(path, shape=(10, 12, 6), zooms=(0.4, 0.4, 0.8), seed=0):
    """An int16 LR volume: a bright ellipsoid ("bone") with a ramp, on noisy soft tissue."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    bone = (grid[0] ** 2 / 0.5 + grid[1] ** 2 / 0.4 + grid[2] ** 2 / 0.9) < 1
    data = 100 + 20 * rng.standard_normal(shape) + bone * (1200 + 300 * grid[0])
    nib.save(nib.Nifti1Image(data.astype(np.int16), rotated_affine(zooms)), path)
    return path


def world(affine, ijk):
    ijk = np.asarray(ijk, np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def lr_centres_in_hr(ijk, axis, factor=FACTOR):
    """HR continuous index of LR voxel centres: in-plane i -> (i + 0.5) * f - 0.5, slice index unchanged."""
    out = np.asarray(ijk, np.float64).copy()
    for d in range(3):
        if d != axis % 3:
            out[:, d] = (out[:, d] + 0.5) * factor - 0.5
    return out


def all_voxels(shape):
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)


def run_cli(args):
    return CliRunner().invoke(cli, ["predict", *map(str, args)])


def final_files(directory):
    """Non-hidden files: what a user would take as results."""
    return sorted(f for f in os.listdir(directory) if not f.startswith(".")) if os.path.isdir(directory) else []


def test_cli_writes_mean_and_var_on_the_input_grid(tmp_path, model_dir):
    src = write_lr(tmp_path / "ear.nii.gz")
    out = tmp_path / "out"
    result = run_cli([src, "--model", model_dir, "--out-dir", out, "--samples", 4, "--seed", 3,
                      "--tile", 32, "--memory-budget", 256])
    assert result.exit_code == 0, result.output
    assert final_files(out) == ["ear_mean.nii.gz", "ear_var.nii.gz"]
    assert sorted(os.listdir(out)) == final_files(out)  # no temporaries left behind
    assert "mean_rel_change" in result.stdout and "seed 3" in result.stdout

    src_img = nib.load(src)
    for name in ("ear_mean.nii.gz", "ear_var.nii.gz"):
        img = nib.load(out / name)
        assert img.shape == (40, 48, 6)
        assert np.allclose(img.header.get_zooms(), (0.1, 0.1, 0.8), atol=1e-6)
        # Each LR voxel centre lies where the HR grid says it does, to 1e-4 mm.
        ijk = all_voxels(src_img.shape)
        assert np.abs(world(img.affine, lr_centres_in_hr(ijk, -1)) - world(src_img.affine, ijk)).max() < 1e-4
        assert img.get_data_dtype() == np.float32
    mean = nib.load(out / "ear_mean.nii.gz").get_fdata()
    var = nib.load(out / "ear_var.nii.gz").get_fdata()
    # The generator's sigmoid output in [0, 1] maps to [500, 3500] HR units, variance at most (scale / 2)^2.
    assert np.isfinite(mean).all() and mean.min() >= 500 - 1e-3 and mean.max() <= 3500 + 1e-3
    assert mean.std() > 0
    assert (var >= 0).all() and (var > 0).any() and var.max() <= (HR_STATS.scale / 2) ** 2


def test_same_seed_gives_identical_files_and_slices_do_not_depend_on_the_roi(tmp_path, model):
    gen, meta = model
    src = write_lr(tmp_path / "ear.nii")
    kwargs = dict(samples=3, stitch="whole")
    a = predict_volume(src, gen, meta, tmp_path / "a", seed=11, **kwargs)
    b = predict_volume(src, gen, meta, tmp_path / "b", seed=11, **kwargs)
    c = predict_volume(src, gen, meta, tmp_path / "c", seed=12, **kwargs)
    part = predict_volume(src, gen, meta, tmp_path / "d", seed=11, roi=((None, None), (None, None), (2, 5)),
                          **kwargs)
    assert a.seed == 11 and a.n_slices == 6 and part.n_slices == 3 and a.slices_per_s > 0
    for key in ("mean", "var"):
        va, vb, vc = (nib.load(r.outputs[key]).get_fdata() for r in (a, b, c))
        assert np.array_equal(va, vb)
        assert not np.array_equal(va, vc)
        vd = nib.load(part.outputs[key]).get_fdata()
        np.testing.assert_allclose(vd, va[:, :, 2:5], rtol=1e-5, atol=1e-4)
    assert slice_seed(11, 2) != slice_seed(11, 3) and slice_seed(11, 2) == slice_seed(11, 2)


def test_identical_slices_get_independent_dropout_masks(tmp_path, model):
    gen, meta = model
    data = np.tile(np.asarray(nib.load(write_lr(tmp_path / "a.nii.gz")).dataobj)[:, :, 2:3], (1, 1, 3))
    nib.save(nib.Nifti1Image(data, rotated_affine((0.4, 0.4, 0.8))), tmp_path / "same.nii.gz")
    res = predict_volume(tmp_path / "same.nii.gz", gen, meta, tmp_path / "out", samples=3, seed=5, stitch="whole")
    mean = nib.load(res.outputs["mean"]).get_fdata()
    assert not np.allclose(mean[:, :, 0], mean[:, :, 1]) and not np.allclose(mean[:, :, 1], mean[:, :, 2])


def test_a_constant_slice_comes_out_as_itself_with_variance_0_not_as_the_network_s_grey(tmp_path, model_dir, model):
    """Padding outside the field of view (and all-air slices below the normalisation's low end) is
    constant: the output keeps it -- the low or high end of the HR range -- with variance 0 and no
    passes, where the network would draw the same texture for any constant."""
    path = write_lr(tmp_path / "padded.nii.gz", shape=(10, 12, 6))
    img = nib.load(path)
    data = np.asarray(img.dataobj).astype(np.int16)
    data[:, :, 0] = -1024  # far below the scan: its normalised value clips to 0
    data[:, :, 5] = 30000  # far above: clips to 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    result = run_cli([path, "--model", model_dir, "--out-dir", tmp_path / "out", "--samples", "auto", "--seed", 3,
                      "--percentiles", 90])
    assert result.exit_code == 0, result.output
    assert "T=auto (0-" in result.output  # the constant slices took no passes
    mean = nib.load(tmp_path / "out" / "padded_mean.nii.gz").get_fdata()
    var = nib.load(tmp_path / "out" / "padded_var.nii.gz").get_fdata()
    p90 = nib.load(tmp_path / "out" / "padded_p90.nii.gz").get_fdata()
    # By hand from HR_STATS: [0, 1] -> (u * (high - low) + low) * std + mean, i.e. 0 -> 500 and 1 -> 3500.
    for k, expected in ((0, 500.0), (5, 3500.0)):
        np.testing.assert_allclose(mean[:, :, k], expected, rtol=1e-6)
        np.testing.assert_allclose(p90[:, :, k], expected, rtol=1e-6)
        assert not var[:, :, k].any()
    assert var[:, :, 1:5].min() > 0  # the scan's own slices are sampled
    gen, _ = model  # what the network itself makes of them: grey, far from either end
    for value in (0.0, 1.0):
        drawn = gen(np.full((1, 40, 48, 1), value, np.float32), seed=tf.constant([[1, 0]])).numpy()
        assert np.abs(drawn - value).mean() > 0.2, value


def test_roi_output_shape_and_affine(tmp_path, model_dir):
    src = write_lr(tmp_path / "ear.nii.gz")
    out = tmp_path / "out"
    result = run_cli([src, "--model", model_dir / "generator.keras", "--out-dir", out, "-T", 2,
                      "--stitch", "whole", "--roi", "2:8,3:,1:4"])
    assert result.exit_code == 0, result.output
    img = nib.load(out / "ear_mean.nii.gz")
    assert img.shape == (24, 36, 3)
    roi_ijk = all_voxels((6, 9, 3))
    src_aff = nib.load(src).affine
    expected = world(src_aff, roi_ijk + np.array([2, 3, 1]))
    assert np.abs(world(img.affine, lr_centres_in_hr(roi_ijk, -1)) - expected).max() < 1e-4


def test_axis_other_than_last(tmp_path, model):
    gen, meta = model
    src = write_lr(tmp_path / "cor.nii.gz", shape=(5, 10, 12), zooms=(0.8, 0.4, 0.4))
    res = predict_volume(src, gen, meta, tmp_path / "out", samples=2, seed=0, stitch="whole", axis=0)
    img = nib.load(res.outputs["mean"])
    assert img.shape == (5, 40, 48) and res.n_slices == 5
    assert np.allclose(img.header.get_zooms(), (0.8, 0.1, 0.1), atol=1e-6)
    ijk = all_voxels((5, 10, 12))
    assert np.abs(world(img.affine, lr_centres_in_hr(ijk, 0)) - world(nib.load(src).affine, ijk)).max() < 1e-4
    assert (nib.load(res.outputs["var"]).get_fdata() > 0).any()


def test_preview_std_percentiles_and_progress(tmp_path, model):
    gen, meta = model
    src = write_lr(tmp_path / "ear.nii.gz")
    calls = []
    res = predict_volume(src, gen, meta, tmp_path / "out", samples=4, seed=1, stitch="paper", tile=32,
                         write_std=True, percentiles=(5, 95), preview=True,
                         progress=lambda done, total, elapsed: calls.append((done, total, elapsed)))
    assert sorted(res.outputs) == ["mean", "p5", "p95", "preview", "std", "var"]
    assert [c[:2] for c in calls] == [(k, 6) for k in range(1, 7)]
    assert all(b[2] >= a[2] >= 0 for a, b in zip(calls, calls[1:]))
    png = cv2.imread(res.outputs["preview"])
    assert png is not None and png.ndim == 3 and png.shape[1] > 3 * 40
    assert png.std() > 0
    std = nib.load(res.outputs["std"]).get_fdata()
    var = nib.load(res.outputs["var"]).get_fdata()
    np.testing.assert_allclose(std ** 2, var, rtol=1e-4, atol=1e-3)
    p5, p95 = (nib.load(res.outputs[k]).get_fdata() for k in ("p5", "p95"))
    assert (p5 <= p95 + 1e-3).all() and (p95 - p5 > 0).any()


@pytest.mark.parametrize("case", ["missing", "not_nifti", "other_scale", "not_coarser", "no_model",
                                  "one_sample", "roi_syntax", "roi_outside", "roi_empty", "bad_axis",
                                  "second_input_bad", "out_dir_is_file", "bad_model_meta", "over_budget",
                                  "corrupt_gzip", "huge_voxel", "too_many_samples"])
def test_bad_input_is_refused_in_one_line_and_writes_nothing(tmp_path, model_dir, case):
    good = write_lr(tmp_path / "good.nii.gz")
    out = tmp_path / "out"
    args = [good, "--model", model_dir, "--out-dir", out, "-T", 2, "--stitch", "whole"]
    expect = ["good.nii.gz"]
    if case == "missing":
        args[0], expect = tmp_path / "nope.nii.gz", ["nope.nii.gz", "not found"]
    elif case == "not_nifti":
        (tmp_path / "junk.nii.gz").write_bytes(b"this is not a NIfTI volume")
        args[0], expect = tmp_path / "junk.nii.gz", ["junk.nii.gz"]
    elif case == "other_scale":
        args[0] = write_lr(tmp_path / "fine.nii.gz", zooms=(0.2, 0.2, 0.8))
        expect = ["fine.nii.gz", "factors 2 x 2", "trained for factors 4 x 4"]
    elif case == "not_coarser":
        args[0] = write_lr(tmp_path / "micro.nii.gz", zooms=(0.05, 0.05, 0.05))
        expect = ["micro.nii.gz", "not coarser"]
    elif case == "no_model":
        args[2], expect = tmp_path / "missing_run", ["missing_run"]
    elif case == "one_sample":
        args[6], expect = 1, ["samples", "[2, 10000]", "got 1"]
    elif case == "roi_syntax":
        args += ["--roi", "0:4,2"]
        expect = ["--roi"]
    elif case == "roi_outside":
        args += ["--roi", "0:4,0:4,0:99"]
        expect = ["good.nii.gz", "0:99", "axis 2"]
    elif case == "roi_empty":
        args += ["--roi", "3:3,:,:"]
        expect = ["good.nii.gz", "3:3"]
    elif case == "bad_axis":
        args += ["--axis", "3"]
        expect = ["--axis", "3"]
    elif case == "second_input_bad":
        args.insert(1, write_lr(tmp_path / "fine.nii.gz", zooms=(0.2, 0.2, 0.8)))
        expect = ["fine.nii.gz"]
    elif case == "out_dir_is_file":
        out.write_text("")
        expect = [f"{out}: exists and is not a directory"]
    elif case == "corrupt_gzip":  # stored deflate blocks with a flipped voxel byte: decodes, fails its CRC-32
        raw = gzip.decompress(good.read_bytes())
        packed = bytearray(gzip.compress(raw, compresslevel=0))
        packed[packed.index(raw[-64:]) + 32] ^= 0xFF
        good.write_bytes(bytes(packed))
        expect = ["good.nii.gz", "corrupt gzip stream", "CRC"]
    elif case == "huge_voxel":  # finite, but float32 arithmetic downstream would overflow
        data = np.asarray(nib.load(good).dataobj, np.float32)
        data[3, 4, 5] = 3e38
        nib.save(nib.Nifti1Image(data, nib.load(good).affine), good)
        expect = ["good.nii.gz", "magnitude 3e+38"]
    elif case == "too_many_samples":  # a mistyped T would run for days
        args[6], expect = 100000, ["samples", "[2, 10000]"]
    elif case == "over_budget":  # refused before any output is written
        args += ["--memory-budget", "0.01"]
        expect = ["needs about", "memory budget"]
    elif case == "bad_model_meta":
        broken = tmp_path / "broken_run"
        broken.mkdir()
        shutil.copy(os.path.join(model_dir, "generator.keras"), broken)
        meta = json.loads((Path(model_dir) / "generator.meta.json").read_text())
        (broken / "generator.meta.json").write_text(json.dumps({**meta, "hr_stats": {"mean": 1.0}}))
        args[2], expect = broken, ["generator.meta.json", "hr_stats", "lack std"]
    result = run_cli(args)
    usage = case in ("one_sample", "roi_syntax", "bad_axis", "too_many_samples")  # option values: exit 2
    assert result.exit_code == (2 if usage else 1)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()[-1 if usage else 0:]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for text in expect:
        assert text in lines[0], lines[0]
    if case == "out_dir_is_file":
        assert out.read_text() == ""
    else:
        assert not out.exists()  # not even an empty folder: it was made for outputs that never came


def test_the_gzip_crc_goes_unchecked_only_for_a_roi_short_of_the_last_slice_with_model_statistics(
        tmp_path, model_dir):
    """The README's limit of the CRC check. The per-scan statistics read the last slice, so a default run
    checks the stream's end whatever its --roi; with --normalize model a --roi that stops before the last
    slice never reads it, and a file whose damage lies in its last voxels is read: its slices are intact,
    and the outputs equal those of the undamaged file."""
    good = write_lr(tmp_path / "good.nii.gz")
    raw = gzip.decompress(good.read_bytes())
    packed = bytearray(gzip.compress(raw, compresslevel=0))
    packed[packed.index(raw[-64:]) + 32] ^= 0xFF  # a voxel of the last slice; the stream still decodes
    bad = tmp_path / "bad" / "good.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(bytes(packed))
    pooled = tmp_path / "pooled_run"  # the model with pooled LR statistics, for --normalize model
    shutil.copytree(model_dir, pooled)
    meta = json.loads((pooled / "generator.meta.json").read_text())
    meta["lr_stats"] = IntensityStats(mean=100.0, std=300.0, low=-1.0, high=4.0).to_dict()
    (pooled / "generator.meta.json").write_text(json.dumps(meta))
    roi = ["-T", 2, "--seed", 1, "--roi", ":,:,0:3"]
    result = run_cli([bad, "--model", model_dir, "--out-dir", tmp_path / "default", *roi])
    assert result.exit_code == 1 and "corrupt gzip stream" in result.output
    for src, out in ((good, tmp_path / "from_good"), (bad, tmp_path / "from_bad")):
        result = run_cli([src, "--model", pooled, "--out-dir", out, *roi, "--normalize", "model"])
        assert result.exit_code == 0, result.output
    for key in ("mean", "var"):
        np.testing.assert_array_equal(nib.load(tmp_path / "from_bad" / f"good_{key}.nii.gz").get_fdata(),
                                      nib.load(tmp_path / "from_good" / f"good_{key}.nii.gz").get_fdata())


def test_library_refusals_name_the_file(tmp_path, model):
    gen, meta = model
    src = write_lr(tmp_path / "ear.nii.gz")
    with pytest.raises(InputError) as info:
        predict_volume(src, gen, meta, tmp_path / "out", samples=2, roi=((0, 20), (0, 4), (0, 2)))
    assert info.value.path == str(src)
    with pytest.raises(ConfigError, match="samples"):
        predict_volume(src, gen, meta, tmp_path / "out", samples=1)
    with pytest.raises(ConfigError, match="metadata lacks hr_stats"):
        predict_volume(src, gen, {k: v for k, v in meta.items() if k != "hr_stats"}, tmp_path / "out")
    assert final_files(tmp_path / "out") == []


def test_sigkill_mid_run_leaves_no_output_and_a_rerun_succeeds(tmp_path, model_dir):
    src = write_lr(tmp_path / "long.nii.gz", shape=(24, 24, 300), zooms=(0.4, 0.4, 0.4))
    out = tmp_path / "out"
    entry = "from microsr_tf.cli.main import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", entry, "predict", str(src), "--model", str(model_dir), "--out-dir", str(out),
         "-T", "4", "--stitch", "whole", "--seed", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sigkill_when(proc, lambda: any(f.endswith(".part") for f in (os.listdir(out) if out.is_dir() else [])),
                 timeout=120, waiting_for="prediction output being written", settle=1.0)
    assert final_files(out) == []
    stale = sorted(os.listdir(out))
    assert stale and all(f.startswith(".long_") for f in stale)

    result = run_cli([src, "--model", model_dir, "--out-dir", out, "-T", 2, "--stitch", "whole",
                      "--roi", ":,:,0:3"])
    assert result.exit_code == 0, result.output
    assert "interrupted run" in result.stderr
    assert final_files(out) == ["long_mean.nii.gz", "long_var.nii.gz"]
    assert nib.load(out / "long_mean.nii.gz").shape == (96, 96, 3)


@pytest.mark.parametrize("axis", ["2", "0"])
def test_a_disk_that_refuses_the_outputs_is_one_line_naming_the_output_before_any_work(tmp_path, model_dir, axis):
    """A file-size limit makes every write past 100 kB fail as a full disk does (EFBIG instead of ENOSPC;
    Python ignores SIGXFSZ): the outputs' blocks are reserved when they are created, so the run stops
    there, naming the output, and leaves no temporary behind. Axis 0 writes through a memmap, which
    would otherwise die of SIGBUS on a full disk."""
    src = write_lr(tmp_path / "ear.nii.gz", shape=(24, 24, 24), zooms=(0.4, 0.4, 0.4))  # 1.8 MB per output
    out = tmp_path / "out"
    out.mkdir()
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # noqa: E731
    entry = "from microsr_tf.cli.main import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", entry, "predict", str(src), "--model", str(model_dir), "--out-dir", str(out),
         "-T", "2", "--axis", axis, "--resample-input"],
        capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert lines == [f"Error: {out / 'ear_mean.nii.gz'}: cannot write the output (File too large); "
                     "nothing was left in its place"], proc.stderr
    assert "slices/s" not in proc.stdout + proc.stderr  # stopped before the first slice
    assert os.listdir(out) == []


def test_sigterm_mid_run_removes_the_temporaries_as_ctrl_c_does(tmp_path, model_dir):
    src = write_lr(tmp_path / "long.nii.gz", shape=(24, 24, 300), zooms=(0.4, 0.4, 0.4))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from microsr_tf.cli.main import main; main()", "predict", str(src), "--model",
         str(model_dir), "--out-dir", str(out), "-T", "4", "--seed", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    code = signal_when(proc, lambda: any(f.endswith(".part") for f in (os.listdir(out) if out.is_dir() else [])),
                       timeout=120, waiting_for="prediction output being written", sig=signal.SIGTERM, settle=1.0)
    assert code == 1
    assert not out.exists()  # no result, no hidden temporary, and not the folder this run made

    out.mkdir()  # a folder the user made stays, empty
    proc = subprocess.Popen(
        [sys.executable, "-c", "from microsr_tf.cli.main import main; main()", "predict", str(src), "--model",
         str(model_dir), "--out-dir", str(out), "-T", "4", "--seed", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    code = signal_when(proc, lambda: any(f.endswith(".part") for f in os.listdir(out)),
                       timeout=120, waiting_for="prediction output being written", sig=signal.SIGTERM, settle=1.0)
    assert code == 1
    assert os.listdir(out) == []


def test_an_output_that_would_replace_an_input_or_land_on_a_folder_is_refused_before_any_work(tmp_path, model_dir):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_lr(scans / "ear.nii.gz")
    second = write_lr(scans / "ear_mean.nii.gz", seed=1)  # what ear.nii.gz's mean would be called
    before = second.read_bytes()
    result = run_cli([scans / "ear.nii.gz", second, "--model", model_dir, "--out-dir", scans, "-T", 2])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{second}: is an input of this run" in lines[0], result.output
    assert second.read_bytes() == before and sorted(os.listdir(scans)) == ["ear.nii.gz", "ear_mean.nii.gz"]

    out = tmp_path / "out"
    (out / "ear_var.nii.gz").mkdir(parents=True)  # a folder where an output file goes
    result = run_cli([scans / "ear.nii.gz", "--model", model_dir, "--out-dir", out, "-T", 2, "--std"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{out / 'ear_var.nii.gz'}: is a folder" in lines[0], result.output
    assert os.listdir(out) == ["ear_var.nii.gz"] and os.listdir(out / "ear_var.nii.gz") == []


def test_percentiles_of_more_samples_than_memory_holds_are_refused_before_any_work(tmp_path, model):
    gen, meta = model
    src = write_lr(tmp_path / "ear.nii.gz")
    with pytest.raises(ConfigError, match="samples kept for percentiles needs about"):
        predict_volume(src, gen, meta, tmp_path / "out", samples=10**6, percentiles=(5, 95), memory_budget=64)
    assert not (tmp_path / "out").exists()


def test_qform_and_sform_that_differ_each_keep_their_own_space(tmp_path, model):
    gen, meta = model
    write_lr(tmp_path / "plain.nii.gz")
    plain = nib.load(tmp_path / "plain.nii.gz")
    data = np.asarray(plain.dataobj)
    scanner = plain.affine.copy()
    scanner[0, :3] *= -1  # x flipped, another origin: scanner space
    scanner[:3, 3] = (5.5, -7.0, 12.0)
    template = plain.affine.copy()
    template[:3, 3] += (10.0, -20.0, 30.0)  # an aligned (template) space 36 mm away
    img = nib.Nifti1Image(data, None)
    img.set_qform(scanner, code=1)
    img.set_sform(template, code=4)
    nib.save(img, tmp_path / "ear.nii.gz")
    res = predict_volume(tmp_path / "ear.nii.gz", gen, meta, tmp_path / "out", samples=2, seed=0)
    out = nib.load(res.outputs["mean"]).header
    assert int(out["qform_code"]) == 1 and int(out["sform_code"]) == 4
    hr = all_voxels((40, 48, 6))[::97]
    lr = np.asarray(hr, np.float64).copy()
    lr[:, :2] = (lr[:, :2] + 0.5) / FACTOR - 0.5  # the LR continuous index of each HR voxel centre
    assert np.abs(world(out.get_qform(), hr) - world(scanner, lr)).max() < 1e-3
    assert np.abs(world(out.get_sform(), hr) - world(template, lr)).max() < 1e-4


def test_a_scan_without_qform_or_sform_gives_outputs_without_them_and_an_roi_keeps_its_place(tmp_path, model):
    # A file with both codes 0 is placed by pixdim alone, each reader by its own rule (nibabel: x flipped and
    # centred; ITK and FSL: voxel 0 at the origin). Writing nibabel's rule into the output as an sform made
    # the output claim an orientation the input never had: other readers then saw them apart.
    gen, meta = model
    data = np.asarray(nib.load(write_lr(tmp_path / "plain.nii.gz")).dataobj)
    img = nib.Nifti1Image(data, None)
    img.header.set_zooms((0.4, 0.4, 0.8))
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    nib.save(img, tmp_path / "bare.nii.gz")
    bare = nib.load(tmp_path / "bare.nii.gz").affine  # nibabel's rule for the input
    assert bare[0, 0] < 0 and abs(bare[0, 3]) > 1  # flipped and centred: not the sform a reader would invent

    def lr_index(hr, offset=(0, 0)):
        lr = np.asarray(hr, np.float64).copy()
        lr[:, :2] = (lr[:, :2] + 0.5) / FACTOR - 0.5 + np.asarray(offset)
        return lr

    res = predict_volume(tmp_path / "bare.nii.gz", gen, meta, tmp_path / "out", samples=2, seed=0)
    out = nib.load(res.outputs["mean"])
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (0, 0)
    np.testing.assert_allclose(out.header.get_zooms(), (0.1, 0.1, 0.8), rtol=1e-6)
    hr = all_voxels(out.shape)[::7]
    assert np.abs(world(out.affine, hr) - world(bare, lr_index(hr))).max() < 1e-4  # same place, same rule
    # ITK/FSL's rule puts voxel 0 of either file at the origin: the HR grid starts 3/8 of an LR voxel early,
    # as any upsampling written without orientation does; nothing is flipped or moved by half the field

    # a sub-volume cannot be placed by pixdim alone: it keeps its place in nibabel's frame, as an aligned sform
    part = predict_volume(tmp_path / "bare.nii.gz", gen, meta, tmp_path / "roi", samples=2, seed=0,
                          roi=((2, 7), (3, 9), (None, None)))
    roi = nib.load(part.outputs["mean"])
    assert (int(roi.header["qform_code"]), int(roi.header["sform_code"])) == (0, 2)
    hr = all_voxels(roi.shape)[::7]
    assert np.abs(world(roi.affine, hr) - world(bare, lr_index(hr, (2, 3)))).max() < 1e-4


def test_a_rerun_that_fails_while_compressing_leaves_the_earlier_outputs_as_a_matching_set(tmp_path, model,
                                                                                          monkeypatch):
    """The outputs are compressed first and renamed together: a failure on the second output's compression
    (a full disk, an interruption) used to come after the first output had replaced its predecessor."""
    import microsr_tf.volumes as volumes

    gen, meta = model
    src = write_lr(tmp_path / "ear.nii.gz")
    out = tmp_path / "out"
    predict_volume(src, gen, meta, out, samples=2, seed=1, preview=True)
    before = {name: (out / name).read_bytes() for name in final_files(out)}
    assert sorted(before) == ["ear_mean.nii.gz", "ear_preview.png", "ear_var.nii.gz"]
    real, calls = volumes._gzip_to_temp, []

    def disk_full_on_the_second(src_path, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src_path, target)

    monkeypatch.setattr(volumes, "_gzip_to_temp", disk_full_on_the_second)
    with pytest.raises(InputError) as info:
        predict_volume(src, gen, meta, out, samples=2, seed=2, preview=True)
    assert str(info.value) == (f"{out / 'ear_var.nii.gz'}: cannot write the output (No space left on device); "
                               "nothing was left in its place")
    assert len(calls) == 2
    assert sorted(os.listdir(out)) == sorted(before)  # no temporary left behind
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_signal_during_the_renames_waits_until_every_output_is_in_place(tmp_path):
    from microsr_tf.files import replace_together

    pairs = []
    for name in ("mean", "var", "preview"):
        (tmp_path / name).write_text("old")
        (tmp_path / f".{name}.tmp").write_text("new")
        pairs.append((tmp_path / f".{name}.tmp", tmp_path / name))

    def moves():  # Ctrl-C arrives after the first rename
        yield pairs[0]
        os.kill(os.getpid(), signal.SIGINT)
        yield from pairs[1:]

    with pytest.raises(KeyboardInterrupt):
        replace_together(moves())
    assert [(tmp_path / name).read_text() for name in ("mean", "var", "preview")] == ["new"] * 3
    assert sorted(os.listdir(tmp_path)) == ["mean", "preview", "var"]
