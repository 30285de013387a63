"""`microsr-tf reproduce`: budgets, the budget rule, refusals, stage skipping and resuming, and a whole run on
the tiny preset (a 96 px phantom and networks of a few filters)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import tensorflow as tf
from click.testing import CliRunner

from microsr_tf.cli.main import cli
from microsr_tf.config import Config
from microsr_tf.errors import ConfigError
from microsr_tf.reproduce import (
    MARGIN, PRESETS, BudgetTooSmall, MethodPlan, RunSettings, check_budget, compare, format_duration,
    minimum_budget, parse_budget, resolve_settings, split_budget, stage_names)
from microsr_tf.training.trainer import latest_checkpoint

from processes import sigkill_when  # tests/processes.py

TINY = ["--preset", "tiny", "--budget", "20m"]  # max 12 steps per method whatever the budget


# ----- budgets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("45m", 2700), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400), ("2h 15min", 8100), (" 45 m ", 2700),
    ("1h30m15s", 5415), ("0.5m", 30), ("3 minutes", 180), ("1 hour", 3600)])
def test_budget_parses(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "45", "soon", "45x", "m", "-5m", "0m", "0s", "45m45m", "1h 30", "45m and",
                                  "1e3s", "m45"])
def test_unparsable_budget_is_one_line(text):
    with pytest.raises(ConfigError) as info:
        parse_budget(text)
    assert "\n" not in str(info.value) and str(info.value).startswith("--budget")


@pytest.mark.parametrize("seconds, text", [(2700, "45m"), (5400, "1h30m"), (90, "1m30s"), (20, "20s"),
                                           (3600, "1h"), (3661, "1h1m1s"), (0.5, "0.5s")])
def test_budget_formats_as_written(seconds, text):
    assert format_duration(seconds) == text
    assert parse_budget(text) == seconds


def _measured(setup, step, checkpoint, every, epoch, name="cyclegan"):
    return MethodPlan(method=name, step_s=step, setup_s=setup, checkpoint_s=checkpoint, epoch_s=epoch,
                      checkpoint_every=every, predict_first_s=0.0, predict_slice_s=0.0)


def test_budget_split_equally_and_steps_fit_the_share():
    # 1000 s: 50 margin, 100 spent, 50 prediction, 50 evaluation -> 750 s of training, 250 s per method.
    measured = {"cyclegan": _measured(setup=10, step=1.0, checkpoint=0.5, every=5, epoch=2),
                "unet": _measured(setup=0, step=0.1, checkpoint=0.0, every=5, epoch=0.0, name="unet"),
                "srgan": _measured(setup=40, step=2.0, checkpoint=1.0, every=10, epoch=5.0, name="srgan")}
    plan = split_budget(1000, 100, 50, 50, measured, min_steps=4, epoch_steps=100, max_epochs=3)
    assert plan.margin_s == 50 and plan.share_s == 250
    cg, unet, srgan = plan.methods["cyclegan"], plan.methods["unet"], plan.methods["srgan"]
    # CycleGAN, 1.1 s per step with checkpoints: one epoch would leave (250 - 10 - 2) / 1.1 = 216 steps, which
    # make 3 epochs; with three epochs' extras (250 - 10 - 6) / 1.1 = 212 steps -> 3 epochs of 70 = 210.
    assert (cg.steps, cg.epochs, cg.steps_per_epoch) == (210, 3, 70)
    assert cg.planned_s == pytest.approx(10 + 210 * 1.1 + 3 * 2)
    # U-Net: 2500 steps, at most 3 epochs -> 3 of 833.
    assert (unet.steps, unet.epochs, unet.steps_per_epoch) == (2499, 3, 833)
    # SRGAN, 2.1 s per step: (250 - 40 - 5) / 2.1 = 97 steps, one epoch.
    assert (srgan.steps, srgan.epochs, srgan.steps_per_epoch) == (97, 1, 97)
    for m in plan.methods.values():
        assert m.planned_s <= plan.share_s


def test_budget_cap_on_steps():
    plan = split_budget(1000, 0, 0, 0, {"unet": _measured(0, 0.1, 0.0, 5, 0.0, "unet")}, min_steps=4,
                        epoch_steps=6, max_epochs=2, max_steps=12)
    assert (plan.methods["unet"].steps, plan.methods["unet"].epochs) == (12, 2)


def test_budget_split_refuses_too_few_steps_naming_the_budget_needed():
    measured = {"cyclegan": _measured(setup=10, step=100.0, checkpoint=0.0, every=5, epoch=2),
                "unet": _measured(setup=0, step=0.1, checkpoint=0.0, every=5, epoch=0.0, name="unet")}
    with pytest.raises(BudgetTooSmall) as info:
        split_budget(1000, 100, 50, 50, measured, min_steps=4, epoch_steps=100, max_epochs=3)
    message = str(info.value)
    # share (1000 - 50 - 200) / 2 = 375 s holds (375 - 10 - 2) // 100 = 3 steps. Needed: the slowest method's
    # 4 steps in one epoch, 10 + 400 + 2 = 412 s, for both methods, plus 200 s, over 0.95: 1077.9 s -> 18 min.
    assert "\n" not in message and "CycleGAN would train 3 steps (at least 4 needed" in message
    assert "give --budget 18m or more" in message


@pytest.mark.parametrize("preset, size", [("tiny", "tiny"), ("cpu", "small"), ("cpu", "adult")])
def test_static_minimum_is_the_boundary(preset, size):
    settings = resolve_settings(None if preset == "tiny" else size, 0, 100, preset)
    needed, parts = minimum_budget(settings)
    ref = PRESETS[preset].reference[size]
    slowest = max(ref.step.values()) * PRESETS[preset].min_steps
    by_hand = (ref.phantoms + 3 * ref.setup + 3 * slowest + 2 * (ref.predict_base + 100 * ref.predict_sample)
               + 2 * ref.evaluate) / (1 - MARGIN)
    assert needed == pytest.approx(by_hand)
    check_budget(needed, settings)
    with pytest.raises(BudgetTooSmall) as info:
        check_budget(needed - 1, settings)
    assert f"--budget {format_duration(60 * math.ceil(needed / 60))} " in str(info.value)


def test_settings_refusals():
    with pytest.raises(ConfigError, match="tiny preset runs on its own tiny phantom"):
        resolve_settings("adult", preset="tiny")
    with pytest.raises(ConfigError, match="sizes adult, small"):
        resolve_settings("paper", preset="cpu")
    with pytest.raises(ConfigError, match="--samples"):
        resolve_settings(None, samples=1)
    assert resolve_settings() == RunSettings("adult", 0, 100, "cpu")


@pytest.mark.parametrize("mine, other, direction, digits, verdict", [
    (2.0, 1.0, "↑", 2, "better"), (1.0, 2.0, "↑", 2, "worse"), (1.0, 2.0, "↓", 2, "better"),
    (0.9, 1.2, "→1", 2, "better"), (1.3, 0.8, "→1", 2, "worse"), (0.1234, 0.1231, "↓", 3, "tie"),
    (0.1236, 0.1231, "↓", 3, "worse"), (math.nan, 1.0, "↑", 2, None), (0.5, 0.6, "ref", 3, None)])
def test_compare_by_direction_at_printed_precision(mine, other, direction, digits, verdict):
    assert compare(mine, other, direction, digits) == verdict


def test_presets_are_valid_train_configs():
    for preset in PRESETS.values():
        for method in ("cyclegan", "unet", "srgan"):
            cfg = preset.config(method)
            assert cfg.model.method == method and cfg.train.steps_per_epoch is None
    cg = PRESETS["cpu"].config("cyclegan")
    assert (cg.model.ngf, cg.model.n_blocks, cg.model.upsample, cg.model.decoder_norm, cg.train.gan_loss,
            cg.train.lambda_identity, cg.train.lambda_lr_consistency, cg.train.lambda_periodic, cg.data.patch_size) == (
        16, 6, "bilinear", "none", "lsgan", 0.5, 1.0, 1.0, 128)
    for method in ("unet", "srgan"):
        base = PRESETS["cpu"].config(method)
        assert (base.model.ngf, base.data.patch_size, base.data.stride, base.train.batch_size) == (
            cg.model.ngf, cg.data.patch_size, cg.data.stride, cg.train.batch_size)


# ----- refusals: one line, nothing written ---------------------------------------------------------------


def _invoke(*args: str):
    result = CliRunner().invoke(cli, ["reproduce", *args])
    return result.exit_code, result.output.strip().splitlines()


def _tree(path: Path) -> dict[str, float]:
    return {str(p.relative_to(path)): p.stat().st_mtime for p in path.rglob("*")} if path.exists() else {}


@pytest.mark.parametrize("args, fragment", [
    (["--budget", "soon"], "--budget 'soon': not a duration"),
    (["--budget", "0m"], "must be longer than zero"),
    (["--budget", "10s"], "--budget 10s is too small to train anything"),
    (["--budget", "45m", "--size", "adult"], "--size adult: the tiny preset runs on its own tiny phantom"),
])
def test_bad_options_refused_before_anything_is_written(tmp_path, args, fragment):
    out = tmp_path / "run"
    code, lines = _invoke("--out", str(out), "--preset", "tiny", *args)
    assert code != 0 and len(lines) == 1 and fragment in lines[0], lines
    assert not out.exists()


def test_budget_too_small_says_how_much_is_needed(tmp_path):
    code, lines = _invoke("--out", str(tmp_path / "run"), "--budget", "5m", "--size", "adult")
    needed, _ = minimum_budget(resolve_settings("adult"))
    assert code != 0 and len(lines) == 1
    assert f"needs at least --budget {format_duration(60 * math.ceil(needed / 60))} " in lines[0]
    assert not (tmp_path / "run").exists()


def test_foreign_folder_and_file_refused(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    code, lines = _invoke("--out", str(folder), *TINY)
    assert code != 0 and len(lines) == 1 and "holds no reproduce run" in lines[0]
    assert sorted(os.listdir(folder)) == ["todo.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, lines = _invoke("--out", str(afile), *TINY)
    assert code != 0 and len(lines) == 1 and "exists and is not a directory" in lines[0]


def test_corrupt_settings_file_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "reproduce.json").write_text("{not json")
    code, lines = _invoke("--out", str(out), *TINY)
    assert code != 0 and len(lines) == 1 and "reproduce.json: cannot read" in lines[0]


# ----- a whole run on the tiny preset --------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, list[str]]:
    """A complete tiny run (through the CLI, in this process) and its printed lines."""
    out = tmp_path_factory.mktemp("reproduce") / "run"
    result = CliRunner().invoke(cli, ["reproduce", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output[-3000:]
    return out, result.output.splitlines()


def _copy(finished_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_dir, out)
    return out


def _report_table(text: str, heading: str) -> dict[str, list[str]]:
    """Rows of the first Markdown table after ``heading``: first cell -> the other cells."""
    block = text.split(heading, 1)[1]
    rows = {}
    for line in block.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


@pytest.mark.slow
def test_end_to_end_report_has_every_method(finished):
    out, lines = finished
    assert [n for n in stage_names() if (out / "stages" / f"{n}.done").is_file()] == stage_names()
    shown = [line for line in lines if re.match(r"\[\d+/14\] ", line)]
    # what runs and how long is left
    assert len(shown) == 14 and all(re.search(r"(budget left|over the 20m budget)\)$", line) for line in shown)
    text = (out / "report.md").read_text()
    table = _report_table(text, "## m-HuM")
    assert list(table)[1:] == ["**bicubic**", "**U-Net**", "**SRGAN**", "**CycleGAN**",
                               "*micro-CT truth* (reference)", "*micro-CT held out* (reference)"]
    assert [table[m][0] for m in ("**U-Net**", "**SRGAN**", "**CycleGAN**")] == ["3.12", "1.29", "0.28"]
    for case, column in (("own", 1), ("held-out", 2)):
        assert f"[evaluation/{case}/report.md](evaluation/{case}/report.md)" in text
        assert (out / "evaluation" / case / "report.md").is_file()
        with open(out / "evaluation" / case / "metrics.csv", newline="") as fh:
            mhum = {row["method"]: float(row["mhum"]) for row in csv.DictReader(fh)}
        for label, name in (("**bicubic**", "bicubic"), ("**U-Net**", "unet"), ("**SRGAN**", "srgan"),
                            ("**CycleGAN**", "cyclegan")):
            assert float(table[label][column]) == pytest.approx(mhum[name], abs=5e-4)
        full = _report_table(text, f"## Full metrics: {'own' if case == 'own' else 'held-out'} scanner")
        assert len(full) == 7  # header + bicubic, three methods, two references
    verdicts = _report_table(text, "## Does the CycleGAN beat bicubic and each baseline?")
    assert list(verdicts["m-HuM ↓"]) and all(re.match(r"(✔ better|✘ worse|= tie) \(", v) for v in verdicts["m-HuM ↓"])

    plan = json.loads((out / "plan.json").read_text())
    for method in ("cyclegan", "unet", "srgan"):
        run = out / "runs" / method
        cfg = Config.load(run / "config.yaml")  # the resolved config, as training writes it
        preset = PRESETS["tiny"].config(method)
        assert cfg.model == preset.model and cfg.data.patch_size == preset.data.patch_size
        p = plan["methods"][method]
        assert p["steps"] == 12 and (cfg.train.epochs, cfg.train.steps_per_epoch) == (p["epochs"], p["steps_per_epoch"])
        assert cfg.train.seed == 0 and cfg.data.seed == 0
        reader = tf.train.load_checkpoint(latest_checkpoint(run))
        steps = {int(reader.get_tensor(n)) for n, _ in tf.train.list_variables(latest_checkpoint(run))
                 if "iterations" in n}
        assert steps == {12}
        for case in ("own", "held-out"):
            var = nib.load(next((out / "predictions" / case / method).glob("*_var.nii.gz"))).get_fdata()
            assert (var.max() > 0) == (method == "cyclegan")  # MC dropout vs deterministic baselines


@pytest.mark.slow
def test_rerun_with_same_settings_skips_every_stage(finished, tmp_path):
    out = _copy(finished[0], tmp_path)
    before = _tree(out)
    code, lines = _invoke("--out", str(out), *TINY)
    assert code == 0, lines
    assert f"skipped {len(stage_names())} finished stage(s)" in "\n".join(lines)
    assert not any(re.match(r"\[\d+/14\] ", line) for line in lines)
    after = _tree(out)
    assert {k: v for k, v in after.items() if k != "reproduce.json"} == {
        k: v for k, v in before.items() if k != "reproduce.json"}


@pytest.mark.slow
def test_other_settings_or_budget_refused_and_nothing_changes(finished, tmp_path):
    out = _copy(finished[0], tmp_path)
    before = _tree(out)
    code, lines = _invoke("--out", str(out), "--preset", "tiny", "--budget", "20m", "--seed", "1")
    assert code != 0 and len(lines) == 1
    assert "holds a reproduce run made with --seed 0 --samples 100 --preset tiny; this one asks for --seed 1" in lines[0]
    code, lines = _invoke("--out", str(out), "--preset", "tiny", "--budget", "25m")
    assert code != 0 and len(lines) == 1 and "was planned for --budget 20m" in lines[0]
    code, lines = _invoke("--out", str(out), "--budget", "45m", "--size", "small")
    assert code != 0 and len(lines) == 1 and "--size small --seed 0 --samples 100 --preset cpu" in lines[0]
    assert _tree(out) == before


@pytest.mark.slow
def test_missing_marker_redoes_that_stage_and_the_later_ones(finished, tmp_path):
    out = _copy(finished[0], tmp_path)
    (out / "stages" / "evaluate-held-out.done").unlink()  # as if killed before the marker was written
    stale = out / "evaluation" / ".held-out-abc123.partial"  # an interrupted evaluation's temporary folder
    stale.mkdir()
    before = _tree(out)
    code, lines = _invoke("--out", str(out), *TINY)
    assert code == 0, lines
    ran = [line.split("]")[1].split(":")[0].strip() for line in lines if re.match(r"\[\d+/14\] ", line)]
    assert ran == ["evaluate-held-out", "report"]
    assert "skipped 12 finished stage(s)" in "\n".join(lines)
    after = _tree(out)
    assert not stale.exists()
    for name in stage_names()[:-2]:
        assert after[f"stages/{name}.done"] == before[f"stages/{name}.done"]
    assert after["report.md"] > before["report.md"]


def _run_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "microsr_tf.cli.main", "reproduce", "--out", str(out), *TINY]


@pytest.mark.slow
def test_sigkill_in_training_and_in_evaluation_then_rerun_completes(finished, tmp_path):
    out = _copy(finished[0], tmp_path)
    # The folder as a run leaves it when the U-Net has finished: SRGAN's training and everything after to do.
    names = stage_names()
    for name in names[names.index("train-srgan"):]:
        (out / "stages" / f"{name}.done").unlink()
    shutil.rmtree(out / "runs" / "srgan")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    proc = subprocess.Popen(_run_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sigkill_when(proc, lambda: latest_checkpoint(out / "runs" / "srgan") is not None, timeout=240,
                 waiting_for="an SRGAN checkpoint")
    assert not (out / "stages" / "train-srgan.done").exists()

    proc = subprocess.Popen(_run_cmd(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = lambda: any((out / "evaluation").glob(".*.partial")) if (out / "evaluation").is_dir() else False
    sigkill_when(proc, partial, timeout=300, waiting_for="an evaluation's temporary folder")
    printed = proc.stdout.read()
    proc.stdout.close()
    assert "train-srgan: 12 steps (2 epochs of 6), planned" in printed and "resuming from its last checkpoint" in printed

    done = subprocess.run(_run_cmd(out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report: " in done.stdout
    assert [n for n in names if (out / "stages" / f"{n}.done").is_file()] == names
    assert not list((out / "evaluation").glob(".*.partial"))
    run = out / "runs" / "srgan"
    reader = tf.train.load_checkpoint(latest_checkpoint(run))
    iterations = [int(reader.get_tensor(n)) for n, _ in tf.train.list_variables(latest_checkpoint(run))
                  if "iterations" in n]
    assert iterations and set(iterations) == {12}
    text = (out / "report.md").read_text()
    assert "**SRGAN**" in text and "[evaluation/held-out/report.md]" in text
