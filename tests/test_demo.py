"""`microsr-tf demo` end to end on the bundled model, as a new user runs it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from click.testing import CliRunner

from microsr_tf.cli.main import cli
from microsr_tf.demo import BUNDLED_MODEL


def test_demo_runs_on_the_bundled_model(tmp_path):
    assert (BUNDLED_MODEL / "1" / "saved_model.pb").is_file()
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--samples", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    mean = nib.load(report["outputs"]["mean"])
    var = np.asarray(nib.load(report["outputs"]["var"]).dataobj)
    assert mean.shape == (192, 192, 48)
    assert np.all(var >= 0) and var.max() > 0
    assert (out / "sub-002_cbct_preview.png").stat().st_size > 1000
    # as in the paper, the uncertainty map follows the bone's structure (its edges)
    assert report["uncertainty_edge_spearman"] > 0.2
    assert 0 < report["ssim_mean"] <= 1 and np.isfinite(report["psnr_mean"])
    assert "PSNR" in result.output and "SSIM" in result.output


def test_demo_refuses_a_non_empty_directory_and_a_missing_model(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "not empty" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "model not found" in result.output
    assert not (tmp_path / "x").exists()
