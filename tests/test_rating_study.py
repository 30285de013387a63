"""Rating study: the blinded page and its key (`rating-study make`), the report of raters' CSVs
(`rating-study report`) against hand-computed statistics, and every refusal of bad input.

The page is driven in a real browser in test_rating_browser.py.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from microsr_tf.cli.main import cli
from microsr_tf.evaluation.rating_report import matched_rank_biserial, rank_sum
from microsr_tf.evaluation.rating_study import CSV_COLUMNS, choose_slices
from microsr_tf.preprocessing import resample_slice
from microsr_tf.volumes import resampled_affine

LR_SHAPE = (6, 7, 5)
LR_AFFINE = np.array([[0.5, 0, 0, 10.0], [0, 0.5, 0, -4.0], [0, 0, 0.3, 2.0], [0, 0, 0, 1]])
FACTOR = 4
ROI_ORIGIN = (1, 2, 1)  # LR voxel where the predictions' region of interest starts
ROI_EXTENT = (4, 4, 4)  # LR voxels it covers
METHODS = {"cycle_gan": (900.0, 40.0), "u-net": (1200.0, 5.0), "sr_gan": (300.0, 80.0)}  # name: (level, noise)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def roi_affine(origin=ROI_ORIGIN) -> np.ndarray:
    """The affine `microsr-tf predict --roi` gives a prediction starting at LR voxel ``origin``."""
    shifted = LR_AFFINE.copy()
    shifted[:3, 3] = LR_AFFINE[:3, :3] @ np.asarray(origin, float) + LR_AFFINE[:3, 3]
    return resampled_affine(shifted, -1, (FACTOR, FACTOR))


PRED_SHAPE = (ROI_EXTENT[0] * FACTOR, ROI_EXTENT[1] * FACTOR, ROI_EXTENT[2])


@pytest.fixture
def inputs(tmp_path):
    """An LR scan and three methods' posterior means on a region of interest of its 4x finer grid."""
    rng = np.random.default_rng(7)
    lr = write_nifti(tmp_path / "scans" / "case.nii.gz", 500 + 100 * rng.standard_normal(LR_SHAPE), LR_AFFINE)
    dirs = {}
    for name, (level, noise) in METHODS.items():
        data = level + noise * rng.standard_normal(PRED_SHAPE)
        write_nifti(tmp_path / f"pred_{name}" / "case_mean.nii.gz", data, roi_affine())
        dirs[name] = tmp_path / f"pred_{name}"
    return lr, dirs


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def make_args(lr, dirs, out, *extra):
    args = ["rating-study", "make", "--lr", lr, "--out", out]
    for name, d in dirs.items():
        args += ["--method", f"{name}={d}"]
    return args + list(extra)


def page_data(html: str) -> dict:
    match = re.search(r'<script id="study-data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


def decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    buf = np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8)
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def windowed(slices: list[np.ndarray]) -> list[np.ndarray]:
    """The documented display rule, computed here: 0.5th-99.5th percentile of the volume's shown voxels."""
    lo, hi = np.percentile(np.stack(slices), [0.5, 99.5])
    return [np.clip((s - lo) / (hi - lo), 0, 1) * 255 for s in slices]


def test_slices_are_spread_evenly():
    assert choose_slices(10, 5) == [1, 3, 5, 7, 9]
    assert choose_slices(4, 2) == [1, 3]
    assert choose_slices(48, 3) == [8, 24, 40]
    assert choose_slices(5, 5) == [0, 1, 2, 3, 4]


def test_page_is_blinded_self_contained_and_key_lies_beside_it(inputs, tmp_path):
    lr, dirs = inputs
    out = tmp_path / "study"
    result = run(*make_args(lr, dirs, out, "--slices", 3, "--seed", 5))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["key.json", "study.html"]  # no temporaries left
    html = (out / "study.html").read_text(encoding="utf-8")
    lowered = html.lower()
    for name, d in dirs.items():
        assert name.lower() not in lowered  # names hold '_' or '-', which base64 never contains
        assert str(d).lower() not in lowered and d.name.lower() not in lowered
    assert "case.nii" not in lowered and str(tmp_path).lower() not in lowered
    # No network: everything inline, and a Content-Security-Policy that forbids loading anything else.
    assert "default-src 'none'; img-src data:" in html
    assert not re.search(r"https?://", html)
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", html)
    key = json.loads((out / "key.json").read_text())
    assert set(key["methods"]) == set(METHODS)
    data = page_data(html)
    assert data["study_id"] == key["study_id"]
    assert set(data["trials"][0]) == {"id", "lr", "image"}  # nothing that names a method


def test_trials_cover_each_method_and_slice_once_in_seeded_order(inputs, tmp_path):
    lr, dirs = inputs
    for out, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run(*make_args(lr, dirs, tmp_path / out, "--slices", 3, "--seed", seed)).exit_code == 0
    keys = {o: json.loads((tmp_path / o / "key.json").read_text()) for o in "abc"}
    trials = keys["a"]["trials"]
    assert keys["a"]["slices"] == [0, 2, 3]  # choose_slices(4, 3)
    assert sorted((t["method"], t["slice"]) for t in trials) == sorted(
        (m, s) for m in METHODS for s in (0, 2, 3))
    page_ids = [t["id"] for t in page_data((tmp_path / "a" / "study.html").read_text())["trials"]]
    assert page_ids == [t["trial"] for t in trials]
    assert (tmp_path / "a" / "study.html").read_bytes() == (tmp_path / "b" / "study.html").read_bytes()
    assert keys["a"] == keys["b"]
    order = [(t["method"], t["slice"]) for t in trials]
    assert order != [(t["method"], t["slice"]) for t in keys["c"]["trials"]]  # another seed, another order
    assert keys["c"]["study_id"] != keys["a"]["study_id"]
    assert order != sorted(order)


def test_images_are_the_right_slices_in_the_documented_window(inputs, tmp_path):
    """LR panel = the LR region under the prediction (found from its affine), bicubic-upsampled;
    right panel = that method's slice; each volume windowed by its own 0.5-99.5 percentiles."""
    lr, dirs = inputs
    out = tmp_path / "study"
    assert run(*make_args(lr, dirs, out, "--slices", 2)).exit_code == 0
    key = json.loads((out / "key.json").read_text())
    data = page_data((out / "study.html").read_text())
    slices = [1, 3]  # choose_slices(4, 2)
    assert key["slices"] == slices and key["lr_origin"] == list(ROI_ORIGIN) and key["axis"] == 2
    lr_arr = nib.load(lr).get_fdata()
    (i0, j0, k0), (ni, nj, _) = ROI_ORIGIN, ROI_EXTENT
    lr_up = [resample_slice(lr_arr[i0:i0 + ni, j0:j0 + nj, k0 + s], (FACTOR, FACTOR)) for s in slices]
    expected_lr = windowed(lr_up)
    expected = {name: windowed([nib.load(d / "case_mean.nii.gz").get_fdata()[:, :, s] for s in slices])
                for name, d in dirs.items()}
    for page_trial, key_trial in zip(data["trials"], key["trials"]):
        s = slices.index(key_trial["slice"])
        shown_lr = decode(data["lr_images"][page_trial["lr"]])
        shown = decode(page_trial["image"])
        assert shown_lr.shape == shown.shape == PRED_SHAPE[:2]
        assert np.abs(shown_lr - expected_lr[s]).max() <= 0.51
        assert np.abs(shown - expected[key_trial["method"]][s]).max() <= 0.51
        assert abs(shown.astype(float).mean() - 127.5) < 40  # each method fills its window, whatever its level


def _lines(result) -> list[str]:
    return [line for line in result.output.strip().splitlines() if line]


@pytest.mark.parametrize("case", ["no_equals", "empty_name", "bad_name", "same_name", "same_folder", "dir_missing",
                                  "dir_is_file",
                                  "no_mean_file", "shape_mismatch", "other_region", "half_voxel_offset",
                                  "not_finer", "outside_lr", "lr_missing", "too_many_slices", "out_is_file",
                                  "out_has_study"])
def test_make_refuses_bad_input_with_one_line_and_writes_nothing(inputs, tmp_path, case):
    lr, dirs = inputs
    out = tmp_path / "study"
    dirs = dict(dirs)
    extra: list = []
    if case == "no_equals":
        args = ["rating-study", "make", "--lr", lr, "--out", out, "--method", str(dirs["u-net"])]
        expect = f"--method '{dirs['u-net']}': expected NAME=DIR"
    elif case in ("empty_name", "bad_name", "same_name"):
        spec = {"empty_name": f"={dirs['u-net']}", "bad_name": f"a,b={dirs['u-net']}",
                "same_name": f"cycle_gan={dirs['u-net']}"}[case]
        args = make_args(lr, dirs, out) + ["--method", spec]
        expect = f"--method '{spec}':"
    elif case == "same_folder":  # one prediction under a second name, through another spelling of its path
        spec = f"copy={dirs['u-net']}/../{dirs['u-net'].name}"
        args = make_args(lr, dirs, out) + ["--method", spec]
        expect = (f"--method '{spec}': {dirs['u-net']}/../{dirs['u-net'].name}/case_mean.nii.gz is method 'u-net''s "
                  "prediction too; give each method its own predictions")
    else:
        target = dirs["u-net"] / "case_mean.nii.gz"
        expect = f"{target}:"
        if case == "dir_missing":
            dirs["u-net"] = tmp_path / "nowhere"
            expect = f"{tmp_path / 'nowhere'}: folder of method 'u-net' not found"
        elif case == "dir_is_file":
            dirs["u-net"] = target
            expect = f"{target}: method 'u-net' must name a folder"
        elif case == "no_mean_file":
            target.rename(target.with_name("other_mean.nii.gz"))
            expect = f"{target}: not found"
        elif case == "shape_mismatch":
            write_nifti(target, np.ones(PRED_SHAPE[:2] + (3,)), roi_affine())
            expect = f"{target}: shape (16, 16, 3) differs from"
        elif case == "other_region":
            write_nifti(target, np.ones(PRED_SHAPE), roi_affine((0, 2, 1)))
            expect = f"{target}: lies on a different part of"
        elif case == "half_voxel_offset":
            affine = roi_affine()
            affine[0, 3] += 0.25
            write_nifti(target, np.ones(PRED_SHAPE), affine)
            expect = f"{target}: its grid is offset by a fraction of an LR voxel along axis 0"
        elif case == "not_finer":
            for d in dirs.values():
                write_nifti(d / "case_mean.nii.gz", np.ones((4, 4, 4)), LR_AFFINE)
            target = dirs["cycle_gan"] / "case_mean.nii.gz"
            expect = f"{target}: its grid"
        elif case == "outside_lr":
            for d in dirs.values():
                write_nifti(d / "case_mean.nii.gz", np.ones(PRED_SHAPE), roi_affine((3, 2, 1)))
            target = dirs["cycle_gan"] / "case_mean.nii.gz"
            expect = f"{target}: covers LR voxels 3:7 along axis 0, outside"
        elif case == "lr_missing":
            lr = tmp_path / "scans" / "missing.nii.gz"
            expect = f"{lr}: file not found"
        elif case == "too_many_slices":
            extra = ["--slices", 5]
            expect = f"{dirs['cycle_gan'] / 'case_mean.nii.gz'}: has 4 slices along axis 2, fewer than --slices 5"
        elif case == "out_is_file":
            out.write_text("")
            expect = f"{out}: exists and is not a directory"
        elif case == "out_has_study":
            out.mkdir()
            (out / "key.json").write_text("{}")
            expect = f"{out / 'key.json'}: already exists"
        args = make_args(lr, dirs, out, *extra)
    before = sorted(out.iterdir()) if out.is_dir() else (out.read_bytes() if out.exists() else None)
    result = run(*args)
    usage = case in ("no_equals", "empty_name", "bad_name", "same_name")  # a malformed option value: exit 2
    assert result.exit_code == (2 if usage else 1)
    lines = _lines(result)
    if usage:
        assert lines[0].startswith("Usage: ") and "Traceback" not in result.output
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {expect}"), result.output
    after = sorted(out.iterdir()) if out.is_dir() else (out.read_bytes() if out.exists() else None)
    assert after == before  # nothing written


# ---- report ---------------------------------------------------------------------------------------

def write_key(path: Path, study_id="abc123", methods=("A", "B"), slices=(0, 1, 2)) -> Path:
    trials = [{"trial": f"t{i + 1:02d}", "method": m, "slice": s}
              for i, (s, m) in enumerate((s, m) for s in slices for m in methods)]
    path.write_text(json.dumps({"format": "microsr-tf rating-study key 1", "study_id": study_id,
                                "methods": {m: f"/data/{m}" for m in methods}, "trials": trials}))
    return path


def write_csv(path: Path, rows, study_id="abc123", header=CSV_COLUMNS) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(header)
    for rater, trial, a, b in rows:
        writer.writerow([study_id, rater, trial, a, b, "2026-01-01T00:00:00Z"])
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


# trial -> (method, slice) of write_key: t01 A0, t02 B0, t03 A1, t04 B1, t05 A2, t06 B2
RATER_1 = [("ann", "t01", 6, 2), ("ann", "t02", 3, 2), ("ann", "t03", 5, 3), ("ann", "t04", 5, 1),
           ("ann", "t05", 4, 4), ("ann", "t06", 2, 5)]
RATER_2 = [("bob, MD", "t01", 5, 4), ("bob, MD", "t02", 5, 4), ("bob, MD", "t03", 6, 6), ("bob, MD", "t04", 2, 1),
           ("bob, MD", "t05", 3, ""), ("bob, MD", "t06", 1, 1)]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_report_matches_hand_computed_statistics(tmp_path):
    """One rater, criterion (a): A = 6, 5, 4 and B = 3, 5, 2 on slices 0, 1, 2."""
    key = write_key(tmp_path / "key.json")
    out = tmp_path / "report"
    result = run("rating-study", "report", write_csv(tmp_path / "ann.csv", RATER_1), "--key", key, "--out", out)
    assert result.exit_code == 0, result.output
    row = read_rows(out / "pairwise.csv")[0]
    assert (row["criterion"], row["method_a"], row["method_b"]) == ("resolution_noise", "A", "B")
    # Rank-sum: of the 9 (A, B) pairs A wins 7, ties 1 (5 = 5), loses 1 (4 < 5): U = 7.5, r = (7 - 1) / 9.
    assert float(row["u"]) == 7.5
    assert float(row["r_rank_biserial"]) == pytest.approx(6 / 9)
    # Tie-corrected normal approximation with continuity correction, by hand: one tie of two in N = 6.
    sigma = math.sqrt(3 * 3 / 12 * (7 - (2 ** 3 - 2) / (6 * 5)))
    assert float(row["p_rank_sum"]) == pytest.approx(math.erfc((7.5 - 4.5 - 0.5) / sigma / math.sqrt(2)))
    # Signed-rank on slices: d = 3, 0, 2 -> the tie is dropped, ranks of |d| = 2, 1, both positive:
    # W = min(R+, R-) = 0, exact p = 2 * (1/2)^2 = 0.5, matched rank-biserial (3 - 0) / 3 = 1.
    assert (int(row["n_pairs"]), int(row["n_pairs_nonzero"])) == (3, 2)
    assert float(row["w"]) == 0 and float(row["p_signed_rank"]) == pytest.approx(0.5)
    assert float(row["r_matched_rank_biserial"]) == 1.0
    summary = {(r["criterion"], r["method"]): r for r in read_rows(out / "summary.csv")}
    a = summary["resolution_noise", "A"]
    assert (int(a["n"]), float(a["median"]), float(a["mean"]), float(a["q1"]), float(a["q3"])) == (3, 5, 5, 4.5, 5.5)
    md = (out / "report.md").read_text()
    assert "| Resolution and noise | A | B | 3 | 3 | 7.5 |" in md
    assert "![Ratings per method and criterion](boxplots.png)" in md
    png = cv2.imread(str(out / "boxplots.png"))
    assert png is not None and png.shape[0] > 300 and png.shape[1] > 500
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_effect_sizes_against_hand_values():
    # Ranks of |d| = |2|, |1|, |-1| are 3, 1.5, 1.5: R+ = 4.5, R- = 1.5, r = 3 / 6.
    assert matched_rank_biserial([2, 1, -1, 0]) == pytest.approx(0.5)
    assert matched_rank_biserial([0, 0]) is None
    assert rank_sum([6, 6], [1, 2])[2] == 1.0 and rank_sum([1, 2], [6, 6])[2] == -1.0
    assert rank_sum([3, 3], [3, 3])[2] == 0.0


def test_several_raters_combine(tmp_path):
    key = write_key(tmp_path / "key.json")
    out = tmp_path / "report"
    csvs = [write_csv(tmp_path / "ann.csv", RATER_1), write_csv(tmp_path / "bob.csv", RATER_2)]
    assert run("rating-study", "report", *csvs, "--key", key, "--out", out).exit_code == 0
    rows = {r["criterion"]: r for r in read_rows(out / "pairwise.csv")}
    # Criterion (b): A = 2, 3, 4 (ann) + 4, 6 (bob; his t05 is blank); B = 2, 1, 5 (ann) + 4, 1, 1 (bob).
    a, b = [2, 3, 4, 4, 6], [2, 1, 5, 4, 1, 1]
    row = rows["shape_structure"]
    assert (int(row["n_a"]), int(row["n_b"])) == (5, 6)
    wins = sum((x > y) - (x < y) for x in a for y in b)
    assert float(row["r_rank_biserial"]) == pytest.approx(wins / 30)
    assert float(row["p_rank_sum"]) == pytest.approx(stats.mannwhitneyu(a, b).pvalue)
    # Pairs: the same rater's A and B on the same slice, only where both exist: ann 0, 1, 2 and bob 0, 1.
    pa, pb = [2, 3, 4, 4, 6], [2, 1, 5, 4, 1]
    assert int(row["n_pairs"]) == 5 and int(row["n_pairs_nonzero"]) == 3
    assert float(row["p_signed_rank"]) == pytest.approx(stats.wilcoxon(pa, pb).pvalue)
    # d = 2, -1, 5 (ties dropped): ranks 2, 1, 3 -> (5 - 1) / 6.
    assert float(row["r_matched_rank_biserial"]) == pytest.approx(4 / 6)
    assert "12 rated trial(s) from 2 rater(s) (ann: 6, bob, MD: 6)" in (out / "report.md").read_text()


@pytest.mark.parametrize("case", ["other_study", "rating_zero", "rating_seven", "rating_text", "missing_column",
                                  "ragged_row", "empty_file", "not_utf8", "bad_quote", "unknown_trial",
                                  "twice_across_files", "empty_rater", "no_ratings", "csv_missing", "key_missing",
                                  "key_not_json", "key_not_a_key", "out_is_file", "no_scores"])
def test_report_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, case):
    key = write_key(tmp_path / "key.json")
    good = write_csv(tmp_path / "ann.csv", RATER_1)
    bad = tmp_path / "bad.csv"
    files = [bad]
    out = tmp_path / "report"
    rows = [list(r) for r in RATER_2]
    if case == "other_study":
        write_csv(bad, RATER_2, study_id="zzz999")
        expect = f"{bad}: line 2: ratings of study 'zzz999', but {key} is the key of study 'abc123'"
    elif case in ("rating_zero", "rating_seven", "rating_text"):
        rows[2][2] = {"rating_zero": 0, "rating_seven": 7, "rating_text": "five"}[case]
        write_csv(bad, rows)
        expect = (f"{bad}: line 4: resolution_noise rating 'five' is not a whole number 1-6" if case == "rating_text"
                  else f"{bad}: line 4: resolution_noise rating {rows[2][2]} is outside 1-6")
    elif case == "missing_column":
        bad.write_text("study_id,rater,trial,resolution_noise,rated_at\nabc123,bob,t01,3,x\n")
        expect = f"{bad}: not a rating-study CSV: missing column(s) shape_structure"
    elif case == "ragged_row":
        write_csv(bad, RATER_2)
        bad.write_text(bad.read_text() + "abc123,bob,t01\r\n")
        expect = f"{bad}: line 8: 3 fields, but the header has 6"
    elif case == "empty_file":
        bad.write_text("")
        expect = f"{bad}: empty file"
    elif case == "not_utf8":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
        expect = f"{bad}: not UTF-8 text"
    elif case == "bad_quote":
        bad.write_text('study_id,rater,trial,resolution_noise,shape_structure,rated_at\nabc123,"bo"b,t01,3,3,x\n')
        expect = f"{bad}: malformed CSV"
    elif case == "unknown_trial":
        rows[0][1] = "t99"
        write_csv(bad, rows)
        expect = f"{bad}: line 2: trial 't99' is not part of study abc123"
    elif case == "twice_across_files":
        write_csv(bad, RATER_1[3:])
        files = [good, bad]
        expect = f"{bad}: line 2: rater 'ann' rated trial t04 already ({good} line 5)"
    elif case == "empty_rater":
        rows[1][0] = " "
        write_csv(bad, rows)
        expect = f"{bad}: line 3: empty rater name"
    elif case == "no_ratings":
        write_csv(bad, [])
        expect = f"{bad}: holds no ratings"
    elif case == "no_scores":
        write_csv(bad, [(rater, trial, "", "") for rater, trial, _, _ in RATER_2])
        expect = f"{bad}: holds no scores"
    elif case == "csv_missing":
        expect = f"{bad}: ratings file not found"
    elif case == "key_missing":
        key.unlink()
        files = [good]
        expect = f"{key}: key file not found"
    elif case == "key_not_json":
        key.write_text("{not json")
        files = [good]
        expect = f"{key}: not a JSON study key"
    elif case == "key_not_a_key":
        key.write_text(json.dumps({"study_id": "abc123"}))
        files = [good]
        expect = f"{key}: not a key written by `microsr-tf rating-study make`"
    elif case == "out_is_file":
        out.write_text("")
        files = [good]
        expect = f"{out}: exists and is not a directory"
    result = run("rating-study", "report", *files, "--key", key, "--out", out)
    assert result.exit_code != 0
    lines = _lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"Error: {expect}"), result.output
    assert out.is_file() if case == "out_is_file" else not out.exists()


def test_an_earlier_report_is_replaced_only_with_overwrite_and_a_folder_in_the_way_stops_it_before_writing(tmp_path):
    key = write_key(tmp_path / "key.json")
    good = write_csv(tmp_path / "ann.csv", RATER_1)
    out = tmp_path / "report"
    assert run("rating-study", "report", good, "--key", key, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run("rating-study", "report", good, write_csv(tmp_path / "bob.csv", RATER_2), "--key", key, "--out", out)
    assert result.exit_code == 1 and _lines(result) == [f"Error: {out}: holds a report already; pass --overwrite to "
                                                        "replace it or choose another --out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = run("rating-study", "report", good, tmp_path / "bob.csv", "--key", key, "--out", out, "--overwrite")
    assert result.exit_code == 0 and "2 rater(s)" in (out / "report.md").read_text()

    other = tmp_path / "other"
    (other / "boxplots.png").mkdir(parents=True)
    result = run("rating-study", "report", good, "--key", key, "--out", other, "--overwrite")
    assert result.exit_code == 1 and _lines(result)[0].startswith(f"Error: {other / 'boxplots.png'}: is a folder")
    assert sorted(p.name for p in other.iterdir()) == ["boxplots.png"]


def test_rating_study_help_lists_both_subcommands():
    result = run("rating-study", "--help")
    assert result.exit_code == 0
    assert re.search(r"^\s+make\s", result.output, re.M) and re.search(r"^\s+report\s", result.output, re.M)


@pytest.mark.slow
def test_page_assets_ship_in_the_wheel(tmp_path):
    """A normal (non-editable) install carries the page template, CSS and script."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("microsr_tf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("rating_page.html", "rating_page.css", "rating_page.js", "rating_study.py", "rating_report.py"):
        assert f"microsr_tf/evaluation/{asset}" in names


def test_ci_installs_chromium_then_runs_exactly_the_readme_test_command():
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    (command,) = re.findall(r"^(pip install -e \"\.\[test\]\" && python -m pytest -q)\s", readme, re.M)
    ci = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    assert ci[-1] == command
    install = next(i for i, line in enumerate(ci) if "apt-get install -y chromium chromium-driver" in line)
    assert install < len(ci) - 1 and re.search(r"apt-get install\s+chromium\s+chromium-driver", readme)
