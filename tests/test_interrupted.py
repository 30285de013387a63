"""SIGKILL in the middle of `prepare` and `export` leaves nothing at the final path, and a rerun
completes (`train` is covered in test_resume.py, `predict` in test_predict.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import tensorflow as tf
from click.testing import CliRunner

from microsr_tf.cli.main import cli
from microsr_tf.models.artifact import save_generator
from microsr_tf.models.generator import ResnetGenerator
from microsr_tf.pipeline import read_shard_index

from processes import sigkill_when  # tests/processes.py

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
CLI = [sys.executable, "-m", "microsr_tf.cli.main"]


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []


def _volume(path: Path, n: int, spacing: float, slices: int) -> None:
    yy, xx = np.mgrid[:n, :n] / n
    disk = 1000.0 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.15)
    noise = np.random.default_rng(n).normal(0, 20, (n, n, slices))
    nib.save(nib.Nifti1Image((disk[..., None] + noise).astype(np.float32), np.diag([spacing, spacing, 0.5, 1])), path)


def test_sigkill_during_prepare_leaves_no_shards_folder_and_a_rerun_completes(tmp_path):
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir()
    hr.mkdir()
    _volume(lr / "a.nii.gz", 24, 0.4, 40)
    _volume(hr / "b.nii.gz", 96, 0.1, 40)
    out = tmp_path / "shards"
    args = ["prepare", "--lr-dir", str(lr), "--hr-dir", str(hr), "--out", str(out), "--patch-size", "32",
            "--stride", "4"]
    proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # killed while the hidden temporary folder beside the target is being filled with shards
    sigkill_when(proc, lambda: any(any(t.glob("*.tfrecord")) for t in _hidden(tmp_path)), timeout=240,
                 waiting_for="shards being written")
    assert not out.exists()
    assert _hidden(tmp_path)  # the interrupted temporary is left hidden beside it
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    index = read_shard_index(out)
    assert index["counts"]["hr"] > 1000 and json.loads((out / "index.json").read_text())["patch_size"] == 32


def test_sigkill_during_export_leaves_no_version_and_a_rerun_completes(tmp_path):
    gen = ResnetGenerator(ngf=4, n_blocks=1)
    gen(tf.zeros([1, 32, 32, 1]))
    meta = {"format": 1, "hr_spacing": [0.1, 0.1], "lr_spacing": [0.4, 0.4], "factors": [4.0, 4.0],
            "hr_stats": {"mean": 100.0, "std": 20.0, "low": -2.0, "high": 3.0}, "model": {"ngf": 4, "n_blocks": 1},
            "patch_size": 32, "axis": -1}
    save_generator(gen, tmp_path / "g.keras", meta)
    base = tmp_path / "export"
    args = ["export", "--model", str(tmp_path / "g.keras"), "--out", str(base), "--samples", "4"]
    proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sigkill_when(proc, lambda: bool(_hidden(base)), timeout=240, waiting_for="the export's temporary folder",
                 settle=0.5)
    assert not (base / "1").exists() and [p.name for p in base.iterdir() if not p.name.startswith(".")] == []
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in base.iterdir() if not p.name.startswith(".")) == ["1"]
    assert tf.saved_model.load(str(base / "1")).signatures["serving_default"] is not None
