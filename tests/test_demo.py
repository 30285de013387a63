"""`microsr-tf demo` end to end on the bundled model, as a new user runs it."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
from click.testing import CliRunner

from microsr_tf.cli.main import cli
from microsr_tf.demo import BUNDLED_MODEL, HEADLINE


def test_demo_runs_on_the_bundled_model_and_prints_the_evaluation(tmp_path):
    assert (BUNDLED_MODEL / "1" / "saved_model.pb").is_file()
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--samples", "4", "--slices", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    mean = nib.load(report["outputs"]["mean"])
    var = np.asarray(nib.load(report["outputs"]["var"]).dataobj)
    assert mean.shape == (384, 384, 4)
    assert np.all(var >= 0) and var.max() > 0
    assert (out / "prediction" / "sub-002_cbct_preview.png").stat().st_size > 1000
    # the evaluation instrument ran: its report folder, and the headline rows for model, bicubic and truth
    assert (out / "report" / "report.md").is_file() and (out / "report" / "metrics.csv").is_file()
    figures = report["figures"]
    assert set(figures) >= {"microsr", "bicubic", "micro-CT truth"}
    assert all(math.isfinite(figures["microsr"][key]) for key, _, _ in HEADLINE)
    csv = (out / "report" / "metrics.csv").read_text().splitlines()
    header, row = csv[0].split(","), next(line for line in csv if line.startswith("microsr,")).split(",")
    assert float(row[header.index("ssim_cal")]) == figures["microsr"]["ssim_cal"]  # printed = reported
    # as in the paper, the uncertainty map follows where the model is wrong
    assert figures["microsr"]["unc_spearman"] > 0.2
    assert figures["microsr"]["unc_ause"] < figures["microsr"]["unc_ause_random"]
    for label in ("m-HuM", "SSIM", "Spearman", "AUSE"):
        assert label in result.output


def test_demo_refuses_a_non_empty_directory_and_a_missing_model(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "not empty" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "model not found" in result.output
    assert not (tmp_path / "x").exists()


def test_a_model_that_does_not_load_leaves_no_output_folder(tmp_path):
    (tmp_path / "broken.keras").write_text("not a zip archive")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "out"),
                                      "--model", str(tmp_path / "broken.keras")])
    assert result.exit_code == 1 and "broken.keras" in result.output and "not a Keras archive" in result.output
    assert not (tmp_path / "out").exists()
