"""`microsr-tf train` and the trainer: a tiny run end to end, TensorBoard contents, resume after
SIGKILL, NaN handling and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
import yaml
from click.testing import CliRunner

from microsr_tf.cli.main import cli
from microsr_tf.config import Config
from microsr_tf.phantoms import write_phantoms
from microsr_tf.training.trainer import TrainingDiverged, latest_checkpoint, train

from tensorboard_events import read_events  # tests/tensorboard_events.py


TINY = {
    "data": {"patch_size": 32, "stride": 16, "seed": 0},
    "model": {"ngf": 4, "n_blocks": 1, "ndf": 4, "n_layers_d": 2},
    "train": {"batch_size": 2, "epochs": 2, "steps_per_epoch": 2, "log_every": 1, "image_every": 2,
              "checkpoint_every": 2, "n_val_patches": 2, "mc_samples_val": 3, "pool_size": 2,
              "strategy": "mirrored"},  # two replicas with the logical CPUs of conftest.py
}
TINY_FLAGS = ["--patch-size", "32", "--stride", "16", "--ngf", "4", "--n-blocks", "1", "--ndf", "4",
              "--batch-size", "2", "--strategy", "default", "--seed", "0"]


@pytest.fixture(scope="module")
def folders(training_folders) -> tuple[Path, Path]:
    """Unpaired LR (0.4 mm, 16 px) and HR (0.1 mm, 64 px) folders, two volumes each (conftest.py)."""
    return training_folders


def test_tiny_run_on_phantoms_outputs_history_and_tensorboard(tmp_path):
    write_phantoms(tmp_path / "phantoms", subjects=1, seed=0, size="small")
    run = tmp_path / "run"
    result = train(Config.from_dict(TINY), tmp_path / "phantoms" / "lr", tmp_path / "phantoms" / "hr", run)

    assert result.steps == 4 and result.epochs == 2
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert all(math.isfinite(h[k]) for k in ("g_loss", "d_loss", "cycle_loss", "adv_loss"))
    assert result.best_cycle_loss == min(h["cycle_loss"] for h in result.history)
    for name in ("config.yaml", "generator.keras", "generator.meta.json", "generator_best.keras"):
        assert (run / name).is_file(), name
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["ngf"] == 4
    meta = json.loads((run / "generator.meta.json").read_text())
    assert {"format", "hr_spacing", "lr_spacing", "factors", "hr_stats", "model", "patch_size", "axis"} <= set(meta)
    assert meta["factors"] == pytest.approx([8.0, 8.0]) and meta["patch_size"] == 32 and meta["model"]["ngf"] == 4
    reader = tf.train.load_checkpoint(latest_checkpoint(run))
    names = [n for n, _ in tf.train.list_variables(latest_checkpoint(run))]
    iterations = [n for n in names if "iterations" in n]
    assert len(iterations) == 2 and all(reader.get_tensor(n) == 4 for n in iterations)

    events = read_events(run / "logs")
    tags = {tag for _, tag, _ in events}
    assert {"step/g_loss", "step/d_loss", "step/cycle_loss", "learning_rate", "epoch/cycle_loss"} <= tags
    assert sorted(s for s, tag, _ in events if tag == "step/g_loss") == [1, 2, 3, 4]
    assert sorted(s for s, tag, _ in events if tag == "epoch/g_loss") == [2, 4]
    lr_values = [float(v) for _, tag, v in events if tag == "learning_rate"]
    assert lr_values == pytest.approx([1e-4] * 4)
    panels = [(s, v) for s, tag, v in events if tag.startswith("validation/")]
    assert [s for s, _ in panels] == [2, 4]
    image = tf.io.decode_png(panels[0][1][2]).numpy()
    assert image.shape == (2 * 32, 5 * 32, 1)  # two validation rows of five 32 px columns
    assert image[:, :32].std() > 0  # the LR input column is not blank


def test_nan_loss_stops_at_last_good_checkpoint(folders, tmp_path):
    cfg = Config.from_dict(TINY).override(
        {"train": {"learning_rate": 1e30, "checkpoint_every": 1, "epochs": 3, "strategy": "default"}})
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, *folders, run)
    message = str(info.value)
    assert "\n" not in message and "NaN/Inf" in message and "last good checkpoint" in message
    last = latest_checkpoint(run)
    step = int(last.rsplit("-", 1)[1])
    assert f"at step {step + 1}" in message  # the diverged step itself was not saved
    assert not (run / "generator.keras").exists()


def _invoke(*args: str):
    result = CliRunner().invoke(cli, ["train", *args])
    lines = result.output.strip().splitlines()
    return result.exit_code, lines


@pytest.mark.parametrize("case", ["empty", "no_nifti", "lr_finer", "patch_too_big", "unknown_key",
                                  "indivisible_batch", "one_volume_too_small", "out_inside_data", "out_is_data"])
def test_bad_input_is_one_line_and_leaves_no_run_dir(case, folders, tmp_path, request):
    lr, hr = folders
    run = tmp_path / "run"
    extra: list[str] = []
    if case == "empty":
        lr = tmp_path / "empty"
        lr.mkdir()
    elif case == "no_nifti":
        lr = tmp_path / "notes"
        lr.mkdir()
        (lr / "readme.txt").write_text("not a volume")
    elif case == "lr_finer":
        lr, hr = hr, lr
    elif case == "patch_too_big":
        extra = ["--patch-size", "128"]
    elif case == "one_volume_too_small":  # it would give no patch but enter the HR statistics
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        for f in sorted(hr.iterdir()):
            os.symlink(f, mixed / f.name)
        img = nib.load(sorted(hr.iterdir())[0])
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:20, :20, :3], img.affine, img.header), mixed / "crop.nii.gz")
        hr = mixed
    elif case == "unknown_key":
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("train:\n  epochs: 1\n  learnig_rate: 0.1\n")
        extra = ["--config", str(cfg)]
    elif case == "out_inside_data":  # the run would become a subfolder of the LR data, unreadable next time
        inside = tmp_path / "lr_copy"
        inside.mkdir()
        for f in sorted(lr.iterdir()):
            os.symlink(f, inside / f.name)
        lr, run = inside, inside / "run"
    elif case == "out_is_data":  # the data folder itself, not empty: the mistake is the folder, not --resume
        run = hr
    elif case == "indivisible_batch":
        request.getfixturevalue("two_cpus")
        extra = ["--strategy", "mirrored"]
    args = ["--lr-dir", str(lr), "--hr-dir", str(hr), "--out", str(run), *TINY_FLAGS, *extra]
    if case == "indivisible_batch":
        args += ["--batch-size", "3"]
    code, lines = _invoke(*args)
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    expected = {"empty": str(lr), "no_nifti": str(lr), "patch_too_big": "patch",
                "one_volume_too_small": f"{hr}/crop.nii.gz: its slices are 20 x 20 px at the HR spacing, smaller",
                "lr_finer": f"{lr}: LR in-plane spacing 0.1 x 0.1 mm is not coarser than the HR target 0.4 x 0.4 mm",
                "unknown_key": "learnig_rate", "indivisible_batch": "not divisible",
                "out_inside_data": f"{run}: lies inside the data folder {lr}",
                "out_is_data": f"{hr}: lies inside the data folder {hr}"}[case]
    assert expected in lines[0]
    if case == "out_is_data":
        assert sorted(p.name for p in hr.iterdir()) == ["case0.nii.gz", "case1.nii.gz"]
    else:
        assert not run.exists()


def test_a_disk_that_refuses_the_checkpoint_is_one_line_naming_it_and_leaves_no_run_dir(folders, tmp_path):
    """A file-size limit fails writes past 50 kB as a full disk does (Python ignores SIGXFSZ); TensorFlow
    reports it as an op error, which must not read as running out of memory."""
    lr, hr = folders
    run = tmp_path / "run"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # noqa: E731
    entry = "from microsr_tf.cli.main import main; main()"
    proc = subprocess.run([sys.executable, "-c", entry, "train", "--lr-dir", str(lr), "--hr-dir", str(hr), "--out",
                           str(run), *TINY_FLAGS, "--epochs", "1", "--steps-per-epoch", "2", "--image-every", "1000"],
                          capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "Error" in line or "Traceback" in line] == [
        f"Error: {run / 'checkpoints' / 'ckpt-2'}: cannot write (File too large)"], proc.stderr
    assert not run.exists()  # a new run that failed leaves nothing


def test_run_dir_rules(folders, tmp_path):
    lr, hr = folders
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    code, lines = _invoke("--lr-dir", str(lr), "--hr-dir", str(hr), "--out", str(busy), *TINY_FLAGS)
    assert code != 0 and len(lines) == 1 and "not empty" in lines[0] and "--resume" in lines[0]
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    code, lines = _invoke("--lr-dir", str(lr), "--hr-dir", str(hr), "--out", str(tmp_path / "new"), "--resume")
    assert code != 0 and len(lines) == 1 and "no checkpoint to resume from" in lines[0]
    assert not (tmp_path / "new").exists()


def test_run_dir_that_is_a_file_is_refused(folders, tmp_path):
    lr, hr = folders
    taken = tmp_path / "taken"
    taken.write_text("notes")
    code, lines = _invoke("--lr-dir", str(lr), "--hr-dir", str(hr), "--out", str(taken), *TINY_FLAGS)
    assert code != 0 and lines == [f"Error: {taken}: exists and is not a directory; choose a run directory"]
    assert taken.read_text() == "notes"


def test_corrupt_checkpoint_is_an_input_error_on_resume(folders, tmp_path):
    lr, hr = folders
    cfg = Config.from_dict(TINY).override({"train": {"epochs": 1, "strategy": "default"}})
    run = tmp_path / "run"
    train(cfg, lr, hr, run, progress=False)
    for data in (run / "checkpoints").glob("*.data-*"):
        data.write_bytes(data.read_bytes()[:100])
    code, lines = _invoke("--lr-dir", str(lr), "--hr-dir", str(hr), "--out", str(run), "--resume", "--epochs", "2")
    assert code != 0 and len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {latest_checkpoint(run)}: cannot read this checkpoint")


def test_new_best_at_a_periodic_checkpoint_step_is_saved(tmp_path):
    """The epoch's last step is also a periodic checkpoint: the new best must reach that checkpoint."""
    import tensorflow as tf

    from microsr_tf.training.callbacks import CheckpointSaver
    from microsr_tf.training.checkpoints import CheckpointRing

    class Model:  # what the callback reads of the model: the step counter and the stop flag
        optimizer = type("Opt", (), {"iterations": tf.Variable(0, dtype=tf.int64)})()
        stop_training = False

    best = tf.Variable(math.inf)
    ring = CheckpointRing(tf.train.Checkpoint(best=best), tmp_path, keep=3)
    saver = CheckpointSaver(ring, every=5, best_cycle=best)
    saver.set_model(Model())
    Model.optimizer.iterations.assign(5)
    saver.on_train_batch_end(4, {"cycle_loss": 0.5, "step/cycle_loss": 0.4})  # periodic save at step 5
    saver.on_epoch_end(0, {"cycle_loss": 0.5})  # same step, new best
    restored = tf.Variable(0.0)
    tf.train.Checkpoint(best=restored).restore(ring.latest_checkpoint).expect_partial()
    assert float(restored.numpy()) == 0.5
