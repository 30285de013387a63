"""The evaluation end to end: grids, the array API, ``microsr-tf evaluate`` on real phantom predictions,
bad input and a killed run."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import cv2
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.ndimage import gaussian_filter
from skimage.filters import threshold_otsu
from skimage.metrics import peak_signal_noise_ratio

from microsr_tf.cli.main import cli
from microsr_tf.demo import BUNDLED_MODEL
from microsr_tf.errors import InputError
from microsr_tf.evaluation import COLUMNS, Settings, evaluate_arrays, parse_predictions
from microsr_tf.evaluation.grids import hr_box, lr_box
from microsr_tf.inference.predict import plan_volume
from microsr_tf.phantoms import SIZES, write_phantoms
from microsr_tf.preprocessing import IntensityStats, resample_slice, volume_stats
from microsr_tf.volumes import open_volume, write_volume

from exports import older_export  # tests/exports.py
from processes import sigkill_when  # tests/processes.py

BUNDLED = BUNDLED_MODEL  # the demo's model, in saved_models/
TINY = dataclasses.replace(SIZES["small"], name="tiny", hr_shape=(192, 192, 12), lr_shape=(24, 24, 12))
ROI_SLICES = (4, 8)
DIRECTIONS = {"mhum": "↓", "lr_psnr": "↑", "lr_ssim": "↑", "grad_w1": "↓", "glcm_w1": "↓", "sharpness": "→1",
              "periodic_2px": "↓", "periodic_4px": "↓", "hum_paired": "↓", "psnr": "↑", "ssim": "↑",
              "psnr_cal": "↑", "ssim_cal": "↑", "unc_spearman": "↑", "unc_ause": "↓", "unc_ause_random": "ref",
              "unc_ratio": "→1"}


def run_cli(args):
    return CliRunner().invoke(cli, ["evaluate", *map(str, args)])


def one_line_error(result, *fragments):
    """A refused command: non-zero exit, one line ``Error: ...`` holding every fragment, no traceback."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def usage_error(result, *fragments):
    """A malformed option value: exit 2, click's usage lines, then one ``Error: ...`` line holding every
    fragment, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[0].startswith("Usage: ") and "Traceback" not in result.output, result.output
    assert lines[-1].startswith("Error: "), result.output
    for fragment in fragments:
        assert str(fragment) in lines[-1], (fragment, lines[-1])


# ---------------------------------------------------------------------------------------------- grids


@pytest.mark.parametrize("lr_spacing,hr_spacing,roi", [
    ((0.48, 0.48, 0.06), 0.06, ((None, None), (None, None), (None, None))),
    ((0.48, 0.48, 0.06), 0.06, ((3, 17), (5, 20), (2, 9))),
    ((0.15, 0.15, 0.1), 0.018, ((4, 30), (0, 25), (1, 3))),  # the paper's 8.33
])
def test_lr_box_recovers_what_predict_upsampled(tmp_path, lr_spacing, hr_spacing, roi):
    affine = np.diag([*lr_spacing, 1.0])
    affine[:3, 3] = (3.0, -7.5, 12.0)
    path = tmp_path / "lr.nii.gz"
    write_volume(path, np.ones((32, 28, 10), np.int16), affine)
    factor = lr_spacing[0] / hr_spacing
    meta = {"hr_spacing": [hr_spacing] * 2, "factors": [factor] * 2, "hr_stats": {}}
    plan = plan_volume(path, meta, roi=roi)  # predict's own grid, computed by the inference module
    box, factors = lr_box("pred", plan.out_shape, plan.out_affine, path, (32, 28, 10), affine)
    assert box == plan.roi
    assert factors == pytest.approx((factor, factor), rel=1e-6)


def test_lr_box_and_hr_box_refuse_misaligned_grids():
    lr_aff = np.diag([0.48, 0.48, 0.06, 1.0])
    pred_aff = lr_aff @ np.diag([1 / 8, 1 / 8, 1, 1.0])
    pred_aff[:2, 3] = lr_aff[:2, :2] @ np.array([0.5 / 8 - 0.5] * 2)
    assert lr_box("p", (192, 192, 4), pred_aff, "lr", (24, 24, 4), lr_aff)[0] == ((0, 24), (0, 24), (0, 4))
    shifted = pred_aff.copy()
    shifted[0, 3] += 0.3 * 0.06
    with pytest.raises(InputError, match="fraction of a voxel"):
        lr_box("p", (192, 192, 4), shifted, "lr", (24, 24, 4), lr_aff)
    with pytest.raises(InputError, match="outside"):
        lr_box("p", (200, 192, 4), pred_aff, "lr", (24, 24, 4), lr_aff)
    hr_aff = np.diag([0.06, 0.06, 0.06, 1.0])
    pred = hr_aff.copy()
    pred[2, 3] += 2 * 0.06
    assert hr_box("p", (10, 10, 3), pred, "hr", (10, 10, 8), hr_aff) == ((0, 10), (0, 10), (2, 5))
    with pytest.raises(InputError, match="does not match the paired HR"):
        hr_box("p", (10, 10, 3), np.diag([0.05, 0.05, 0.06, 1.0]), "hr", (10, 10, 8), hr_aff)
    pred[0, 3] += 0.5 * 0.06
    with pytest.raises(InputError, match="not a whole number of voxels"):
        hr_box("p", (10, 10, 3), pred, "hr", (10, 10, 8), hr_aff)


# ------------------------------------------------------------------------------------------ array API


def synthetic_hr(rng, shape=(64, 64, 4)):
    """Smooth blobs thresholded into 'bone' (bright, textured) on 'soft tissue'."""
    field = gaussian_filter(rng.standard_normal(shape), (4, 4, 1))
    bone = field > 0.1 * field.std()
    return np.where(bone, 3000.0, 1000.0) + 50 * rng.standard_normal(shape)


def test_evaluate_arrays_scores_a_perfect_copy_perfectly_and_sees_a_checkerboard(rng):
    hr_set = [synthetic_hr(rng) for _ in range(3)]
    truth = synthetic_hr(rng)
    lr = truth.reshape(16, 4, 16, 4, 4).mean(axis=(1, 3))
    yy, xx = np.mgrid[:64, :64]
    checker = truth + 300.0 * ((yy + xx) % 2)[:, :, None]
    ev = evaluate_arrays(lr, hr_set, {"copy": (truth, np.full(truth.shape, 100.0)), "checker": checker},
                         paired_hr=truth, settings=Settings(montage_slices=2))
    assert [r.name for r in ev.rows] == ["bicubic", "copy", "checker", "micro-CT truth", "micro-CT held out"]
    copy, checked = ev.row("copy").values, ev.row("checker").values
    assert copy["psnr"] == math.inf and copy["ssim"] == pytest.approx(1.0)
    assert copy["hum_paired"] == 0.0
    assert copy["mhum"] == pytest.approx(ev.row("micro-CT truth").values["mhum"])
    assert checked["periodic_2px"] > 10 * copy["periodic_2px"]
    assert checked["psnr"] < copy["psnr"]
    # A constant predicted std orders pixels no better than chance.
    assert copy["unc_ause"] == pytest.approx(copy["unc_ause_random"], abs=0.1)
    assert {c.key for c in ev.columns} == set(DIRECTIONS)

    # Samples behind distributions and uncertainty are bounded by Settings.max_samples.
    small = evaluate_arrays(lr, hr_set, {"copy": (truth, np.full(truth.shape, 100.0))}, paired_hr=truth,
                            settings=Settings(max_samples=1000))
    assert 0 < small.row("copy").uncertainty_pixels <= 1000
    assert ev.row("copy").uncertainty_pixels == truth.size  # the whole bone box when the budget allows
    assert len(small.row("copy").gradients) <= 1000

    # Without a paired truth each montage slice is shown next to the HR-set slice closest in shape.
    unpaired = evaluate_arrays(lr, hr_set, {"copy": truth}, settings=Settings(montage_slices=2))
    panels = unpaired.row("copy").montage
    assert len(panels) == 2 and all(p.hr is not None and "closest shape" in p.hr_label for p in panels)
    assert "psnr" not in {c.key for c in unpaired.columns}


def test_evaluate_arrays_refuses_a_prediction_off_the_upsampled_grid(rng):
    hr = synthetic_hr(rng)
    lr = hr.reshape(16, 4, 16, 4, 4).mean(axis=(1, 3))
    with pytest.raises(InputError, match="upsampled grid"):
        evaluate_arrays(lr, [hr], {"m": hr[:60]}, factors=(4, 4))


# ------------------------------------------------------------------------------ phantom predictions


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    """A tiny phantom set, its test subject predicted by the bundled model on four slices at T = 4, and a
    second method that has only the mean (no variance file)."""
    from microsr_tf.export import load_model
    from microsr_tf.inference.mc import MCResult
    from microsr_tf.inference.predict import predict_volume

    root = tmp_path_factory.mktemp("eval")
    manifest = write_phantoms(root / "ph", subjects=2, seed=11, size=TINY)
    files = {f["role"]: root / "ph" / f["path"] for f in manifest["files"] if f["role"].startswith("test")}
    gen, meta = load_model(BUNDLED)
    roi = ((None, None), (None, None), ROI_SLICES)
    predict_volume(files["test_lr"], gen, meta, root / "cyclegan", samples=4, seed=0, roi=roi)
    # predict with an identity network (through predict's slice-engine seam): its mean is the network's
    # input in HR units, which is what evaluate's bicubic row claims to be.
    identity = lambda image, seed: MCResult(mean=image, var=np.zeros_like(image), samples=2, seed=seed)  # noqa: E731
    predict_volume(files["test_lr"], gen, meta, root / "identity", samples=2, seed=0, roi=roi, engine=identity)
    (root / "meanonly").mkdir()
    stem = files["test_lr"].name[: -len(".nii.gz")]
    os.link(root / "cyclegan" / f"{stem}_mean.nii.gz", root / "meanonly" / f"{stem}_mean.nii.gz")
    return {"root": root, "lr": files["test_lr"], "hr": files["test_hr"], "hr_dir": root / "ph" / "hr",
            "pred": root / "cyclegan", "meanonly": root / "meanonly", "identity": root / "identity", "stem": stem, "meta": meta}


def evaluate_args(case, out, *extra):
    return ["--lr", case["lr"], "--hr-dir", case["hr_dir"], "--pred", f"cyclegan={case['pred']}",
            "--pred", f"meanonly={case['meanonly']}", "--pred", f"identity={case['identity']}",
            "--paired-hr", case["hr"], "--out", out, *extra]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_evaluate_writes_the_report_on_phantom_predictions(phantom_case, tmp_path):
    case = phantom_case
    out = tmp_path / "report"
    result = run_cli(evaluate_args(case, out, "--model", BUNDLED))
    assert result.exit_code == 0, result.output
    assert "HR set 1/2" in result.stderr and "cyclegan: 4/4 slices" in result.stderr  # progress
    assert sorted(os.listdir(out)) == sorted([
        "report.md", "metrics.csv", "metrics.json", "montage_bicubic.png", "montage_cyclegan.png",
        "montage_meanonly.png", "montage_identity.png", "calibration.png", "sparsification.png", "realism.png"])
    for png in [f for f in os.listdir(out) if f.endswith(".png")]:
        img = cv2.imread(str(out / png))
        assert img is not None and min(img.shape[:2]) > 200, png

    rows = read_csv(out / "metrics.csv")
    assert [r["method"] for r in rows] == ["bicubic", "cyclegan", "meanonly", "identity", "micro-CT truth",
                                           "micro-CT held out"]
    assert [r["kind"] for r in rows] == ["method"] * 4 + ["reference"] * 2
    assert list(rows[0]) == ["method", "kind", *DIRECTIONS]
    by = {r["method"]: r for r in rows}
    for key in DIRECTIONS:
        assert by["cyclegan"][key] != "", key
    for key in ("unc_spearman", "unc_ause", "unc_ause_random", "unc_ratio"):
        assert by["bicubic"][key] == "" and by["meanonly"][key] == ""
    for key in ("mhum", "psnr", "ssim_cal", "lr_psnr", "grad_w1", "periodic_4px"):
        assert by["meanonly"][key] == by["cyclegan"][key]  # the same mean file
    for key in ("psnr", "hum_paired", "unc_ause"):
        assert by["micro-CT truth"][key] == ""
    for key in [k for k in DIRECTIONS if not k.startswith("unc_")]:  # bicubic is predict's input in HR units
        assert float(by["identity"][key]) == pytest.approx(float(by["bicubic"][key]), rel=1e-4, abs=1e-6), key
    assert by["identity"]["unc_ause"] == ""  # a zero variance is no uncertainty to assess
    assert float(by["cyclegan"]["unc_ause"]) < float(by["cyclegan"]["unc_ause_random"])

    data = json.loads((out / "metrics.json").read_text())
    assert {c["key"]: c["direction"] for c in data["columns"]} == DIRECTIONS
    assert data["rows"][1]["n_slices"] == ROI_SLICES[1] - ROI_SLICES[0]
    assert any("variance is zero" in note for note in data["rows"][3]["notes"])
    assert len(data["rows"][1]["sparsification"]["fractions"]) == 100
    report = (out / "report.md").read_text()
    for col in COLUMNS:
        assert f"{col.heading} {col.direction}" in report and f"(`{col.key}`)" in report
    assert "![" in report and "montage_cyclegan.png" in report

    # Bicubic's raw PSNR, recomputed independently from the files: predict's mapping of the LR slices
    # (LR statistics -> [0, 1] -> the model's HR statistics), both sides normalised by the truth.
    lr_vol = open_volume(case["lr"])
    lr_stats = volume_stats(lr_vol, factors=(8.0, 8.0))
    model_hr = IntensityStats.from_dict(case["meta"]["hr_stats"])
    truth = np.asarray(nib.load(case["hr"]).dataobj, np.float64)[:, :, slice(*ROI_SLICES)]
    bicubic = np.stack([model_hr.denormalize(lr_stats.normalize(resample_slice(lr_vol.read_slice(k), (8, 8))))
                        for k in range(*ROI_SLICES)], axis=-1).astype(np.float64)
    fg = truth[truth > threshold_otsu(truth.ravel())]
    lo = np.percentile((truth - fg.mean()) / fg.std(), 0.5)  # air: the 0.5th percentile of every voxel
    hi = np.percentile((fg - fg.mean()) / fg.std(), 99.5)  # dense bone: the 99.5th of the foreground
    to_u = lambda x: np.clip(((x - fg.mean()) / fg.std() - lo) / (hi - lo), 0, 1)  # noqa: E731
    expected = np.mean([peak_signal_noise_ratio(to_u(truth[..., k]), to_u(bicubic[..., k]), data_range=1.0)
                        for k in range(truth.shape[2])])
    assert float(by["bicubic"]["psnr"]) == pytest.approx(expected, abs=1e-3)

    # m-HuM of the model, recomputed with cv2.matchShapes on Otsu masks against every HR-set slice.
    pred = np.asarray(nib.load(case["pred"] / f"{case['stem']}_mean.nii.gz").dataobj, np.float64)
    hr_masks = []
    for path in sorted(case["hr_dir"].iterdir()):
        vol = np.asarray(nib.load(path).dataobj, np.float64)
        t = threshold_otsu(vol.ravel())
        hr_masks += [(vol[..., k] > t).astype(np.uint8) for k in range(vol.shape[2])]
    t = threshold_otsu(pred.ravel())
    per_slice = [min(cv2.matchShapes((pred[..., k] > t).astype(np.uint8), m, cv2.CONTOURS_MATCH_I1, 0)
                     for m in hr_masks) for k in range(pred.shape[2])]
    assert float(by["cyclegan"]["mhum"]) == pytest.approx(np.mean(per_slice), rel=1e-6)


@pytest.mark.slow
def test_bicubic_without_a_model_uses_the_hr_set_statistics(phantom_case, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("an earlier report")
    result = run_cli(["--lr", phantom_case["lr"], "--hr-dir", phantom_case["hr_dir"], "--pred",
                      f"cyclegan={phantom_case['pred']}", "--out", out, "--hu-distance", "I3", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "old.txt" not in os.listdir(out) and "report.md" in os.listdir(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left beside it
    rows = read_csv(out / "metrics.csv")
    assert [r["method"] for r in rows] == ["bicubic", "cyclegan", "micro-CT held out"]
    assert list(rows[0])[2:] == [k for k, c in DIRECTIONS.items() if k not in {
        "hum_paired", "psnr", "ssim", "psnr_cal", "ssim_cal", "unc_spearman", "unc_ause", "unc_ause_random",
        "unc_ratio"}]
    data = json.loads((out / "metrics.json").read_text())
    assert "pooled statistics of the HR set" in data["inputs"]["bicubic intensity mapping"]
    assert data["settings"]["hu_method"] == "I3"
    assert "calibration.png" not in os.listdir(out)


# ------------------------------------------------------------------------------------------ bad input


def test_prediction_syntax_errors_and_duplicates_are_refused():
    for specs, fragment in ((["cyclegan"], "expected NAME=DIR"), (["=out"], "expected NAME=DIR"),
                            (["a=x", "a=y"], "given twice"), (["bicubic=x"], "reserved"),
                            (["bad/name=x"], "must start with a letter")):
        with pytest.raises(Exception, match=fragment):
            parse_predictions(specs)


@pytest.mark.slow
def test_bad_inputs_are_refused_with_one_line_and_nothing_written(phantom_case, tmp_path):
    case = phantom_case
    out = tmp_path / "report"
    base = ["--lr", case["lr"], "--hr-dir", case["hr_dir"], "--out", out]

    usage_error(run_cli(base + ["--pred", "cyclegan"]), "--pred", "NAME=DIR")
    usage_error(run_cli(base + ["--pred", f"a={case['pred']}", "--pred", f"a={case['meanonly']}"]), "given twice")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run_cli(["--lr", case["lr"], "--hr-dir", empty, "--out", out, "--pred", f"m={case['pred']}"]),
                   empty, "no .nii")
    one_line_error(run_cli(base + ["--pred", f"m={empty}"]), empty / f"{case['stem']}_mean.nii.gz", "missing")
    one_line_error(run_cli(base + ["--pred", f"m={tmp_path / 'nowhere'}"]), "nowhere", "not found")
    one_line_error(run_cli(base + ["--pred", f"m={case['pred']}", "--normalize", "model"]), "needs --model")
    # an export made before models stored their LR statistics
    old = older_export(BUNDLED, tmp_path / "old_export", missing="lr_stats")
    one_line_error(run_cli(base + ["--pred", f"m={case['pred']}", "--normalize", "model", "--model", old]),
                   old, "no LR statistics")

    # A prediction shifted by a fraction of a voxel is not on the LR's upsampled grid.
    mean = open_volume(case["pred"] / f"{case['stem']}_mean.nii.gz")
    shifted_dir = tmp_path / "shifted"
    shifted_dir.mkdir()
    affine = mean.affine.copy()
    affine[0, 3] += 0.3 * mean.spacing[0]
    data = np.asarray(nib.load(mean.path).dataobj)
    write_volume(shifted_dir / f"{case['stem']}_mean.nii.gz", data, affine)
    one_line_error(run_cli(base + ["--pred", f"m={shifted_dir}"]), shifted_dir / f"{case['stem']}_mean.nii.gz",
                   "upsampled grid")

    # A paired HR with another voxel size (or shape) than the prediction.
    other = tmp_path / "other_hr.nii.gz"
    write_volume(other, np.ones((100, 100, 12), np.float32), np.diag([0.05, 0.05, 0.06, 1.0]))
    one_line_error(run_cli(base + ["--pred", f"m={case['pred']}", "--paired-hr", other]),
                   case["pred"] / f"{case['stem']}_mean.nii.gz", "paired HR")
    small = tmp_path / "small_hr.nii.gz"
    write_volume(small, np.ones((100, 100, 12), np.float32), open_volume(case["hr"]).affine)
    one_line_error(run_cli(base + ["--pred", f"m={case['pred']}", "--paired-hr", small]), "outside the paired HR")

    # A variance whose shape differs from its mean.
    bad_var = tmp_path / "badvar"
    bad_var.mkdir()
    os.link(mean.path, bad_var / f"{case['stem']}_mean.nii.gz")
    write_volume(bad_var / f"{case['stem']}_var.nii.gz", np.ones((10, 10, 4), np.float32), mean.affine)
    one_line_error(run_cli(base + ["--pred", f"m={bad_var}"]), bad_var / f"{case['stem']}_var.nii.gz", "differs")
    # A "variance" with negative values (a difference image, say) is not one.
    neg_var = tmp_path / "negvar"
    neg_var.mkdir()
    os.link(mean.path, neg_var / f"{case['stem']}_mean.nii.gz")
    write_volume(neg_var / f"{case['stem']}_var.nii.gz", np.full(mean.shape, -5.0, np.float32), mean.affine)
    result = run_cli(base + ["--pred", f"m={neg_var}"])  # found while scoring: after the progress lines
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert last.startswith(f"Error: {neg_var / (case['stem'] + '_var.nii.gz')}: slice 0 holds negative values"), last
    # Method names become file names: two that differ only in case would collide on some disks.
    usage_error(run_cli(base + ["--pred", f"CG={case['pred']}", "--pred", f"cg={case['meanonly']}"]),
                "differ only in case")

    # An HR set at another pixel size.
    coarse = tmp_path / "coarse_hr"
    coarse.mkdir()
    write_volume(coarse / "x.nii.gz", np.ones((20, 20, 12), np.float32), np.diag([0.5, 0.5, 0.06, 1.0]))
    one_line_error(run_cli(["--lr", case["lr"], "--hr-dir", coarse, "--out", out, "--pred", f"m={case['pred']}"]),
                   coarse / "x.nii.gz", "spacing")
    assert not out.exists()

    # An existing report folder is kept unless --overwrite.
    out.mkdir()
    (out / "keep.txt").write_text("earlier report")
    one_line_error(run_cli(base + ["--pred", f"m={case['pred']}"]), out, "--overwrite")
    assert os.listdir(out) == ["keep.txt"]


# ------------------------------------------------------------------------------------------ a killed run


@pytest.mark.slow
def test_sigkill_mid_run_leaves_nothing_and_a_rerun_completes(phantom_case, tmp_path):
    case = phantom_case
    out = tmp_path / "report"
    entry = "from microsr_tf.cli.main import main; main()"
    args = [str(a) for a in ["--lr", case["lr"], "--hr-dir", case["hr_dir"], "--pred", f"cyclegan={case['pred']}",
                             "--out", out]]
    proc = subprocess.Popen([sys.executable, "-c", entry, "evaluate", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".report-")]  # noqa: E731
    sigkill_when(proc, lambda: bool(partial()), timeout=120, waiting_for="the report's temporary folder", settle=0.5)
    assert not out.exists()
    assert partial()

    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert "interrupted run" in result.stderr
    assert "report.md" in os.listdir(out) and "metrics.csv" in os.listdir(out)
