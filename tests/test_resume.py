"""Resume is exact, and a run survives being killed: the patch stream from any step is the tail of the
straight stream; five SIGKILLs at random points of one run, each followed by `--resume`, lose at most
one checkpoint interval each, never leave an unreadable checkpoint, and end with the state of the
same run done in one go; a mid-epoch resume continues the epoch's means; a run resumes in the other precision; changed settings are refused by name."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import yaml
from click.testing import CliRunner

from microsr_tf.cli.main import cli
from microsr_tf.config import Config, DataConfig
from microsr_tf.models.artifact import load_generator
from microsr_tf.pipeline import make_training_data, prepare_shards
from microsr_tf.training.trainer import RunFacts, latest_checkpoint, read_run_settings, train

from processes import sigkill_after_line  # tests/processes.py

EVERY = 2  # checkpoint interval (steps) of the killed run
STEPS = 30
FLAGS = ["--patch-size", "32", "--stride", "16", "--ngf", "4", "--n-blocks", "1", "--ndf", "4", "--batch-size", "2",
         "--strategy", "default", "--seed", "3", "--pool-size", "3", "--epochs", "3", "--steps-per-epoch", "10",
         "--checkpoint-every", str(EVERY), "--log-every", "1", "--image-every", "1000"]
STEP_LINE = re.compile(r"^\s+step (\d+)/(\d+)\b")


def _checkpoint_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint (reading each one proves its index and data files are intact)."""
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH" and not name.startswith("save_counter")}


def _assert_same_state(a: str, b: str, atol: float = 1e-6, skip: tuple[str, ...] = ()) -> None:
    ta, tb = _checkpoint_tensors(a), _checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    assert len(ta) > 100  # four networks, two optimizers with their slots, pools, step counters, run facts
    for name in ta:
        if name.startswith(skip):
            continue
        if isinstance(ta[name], bytes):  # the run's recorded settings (JSON text)
            assert ta[name] == tb[name], name
            continue
        np.testing.assert_allclose(np.asarray(ta[name], np.float64), np.asarray(tb[name], np.float64),
                                   atol=atol, rtol=0, err_msg=name)


def _steps(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for m in map(STEP_LINE.match, lines) if m]


# ----- the stream ---------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["nifti", "shards"])
def test_stream_from_a_step_is_the_tail_of_the_straight_stream(training_folders, tmp_path, source):
    lr, hr = training_folders
    cfg = DataConfig(patch_size=32, stride=16, shuffle_buffer=8, seed=11)
    if source == "shards":
        cfg = dataclasses.replace(cfg, shards_dir=str(prepare_shards(lr, hr, tmp_path / "shards", cfg)))
    data = make_training_data(lr, hr, cfg, n_val=1)
    assert min(data.n_lr_patches, data.n_hr_patches) * 2 < 40 * 3  # the stream below wraps around the data
    straight = [(a.numpy(), b.numpy()) for a, b in data.dataset(3).take(40)]
    for start in (1, 7, 23):  # inside a shuffle window, at a window edge, in the second pass
        tail = [(a.numpy(), b.numpy()) for a, b in data.dataset(3, start_step=start).take(40 - start)]
        for (a, b), (c, d) in zip(straight[start:], tail):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, d)
    # two input pipelines (two workers): each one's stream from a step is its own straight tail
    for pipeline in (0, 1):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2)
        whole = [a.numpy() for a, _ in data.dataset(4, ctx).take(12)]
        tail = [a.numpy() for a, _ in data.dataset(4, ctx, start_step=5).take(7)]
        assert whole[0].shape == (2, 32, 32, 1)
        for a, c in zip(whole[5:], tail):
            np.testing.assert_array_equal(a, c)


# ----- killing a run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight_run(training_folders, tmp_path_factory):
    """The run of the fault-injection test, done in one go."""
    lr, hr = training_folders
    run = tmp_path_factory.mktemp("straight") / "run"
    result = CliRunner().invoke(cli, ["train", "--lr-dir", str(lr), "--hr-dir", str(hr), "--out", str(run), *FLAGS])
    assert result.exit_code == 0, result.output
    assert f"Trained {STEPS} steps (3 epochs)" in result.output
    return run


def test_five_sigkills_each_resumed_lose_at_most_one_interval_and_end_as_the_straight_run(
        training_folders, straight_run, tmp_path):
    lr, hr = training_folders
    run = tmp_path / "run"
    rng = np.random.default_rng(2021)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    fresh = [sys.executable, "-m", "microsr_tf.cli.main", "train", "--lr-dir", str(lr), "--hr-dir", str(hr),
             "--out", str(run), *FLAGS]
    resume = [sys.executable, "-m", "microsr_tf.cli.main", "train", "--out", str(run), "--resume"]  # no folders
    restored = 0
    for kill in range(5):
        proc = subprocess.Popen(resume if kill else fresh, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        target = restored + int(rng.integers(1, 5))  # a random step to wait for, then a random moment after it
        lines = sigkill_after_line(proc, lambda line: any(s >= target for s in _steps([line])), timeout=300,
                                   settle=float(rng.uniform(0.0, 0.4)))
        steps = _steps(lines)
        assert steps[0] == restored + 1 and steps == list(range(steps[0], steps[-1] + 1))  # resumed right after
        latest = latest_checkpoint(run)  # None: killed before the first checkpoint, --resume starts at 0
        saved = int(latest.rsplit("-", 1)[1]) if latest else 0
        # the last printed step had been checkpointed already when it was printed, or is one interval
        # from the last checkpoint: at most one interval is redone
        assert steps[-1] - EVERY < saved <= steps[-1] + 1
        if latest:
            for path in tf.train.get_checkpoint_state(run / "checkpoints").all_model_checkpoint_paths:
                assert _checkpoint_tensors(path)  # every checkpoint the run lists is readable
        assert not (run / "generator.keras").exists()
        assert saved < STEPS, "the run finished before it could be killed"
        restored = saved

    done = CliRunner().invoke(cli, ["train", "--out", str(run), "--resume"])
    assert done.exit_code == 0, done.output
    assert f"Trained {STEPS} steps (3 epochs)" in done.output
    assert _steps(done.output.splitlines())[0] == restored + 1
    assert not set("\r\b\x1b") & set(done.output)  # plain lines when stdout is not a terminal
    newest = max((run / "logs").glob("events.out.tfevents.*"), key=os.path.getmtime)
    logged = [e.step for e in tf.compat.v1.train.summary_iterator(str(newest)) for v in e.summary.value
              if v.tag == "step/g_loss"]
    assert logged == list(range(restored + 1, STEPS + 1))  # TensorBoard picks up right after the checkpoint
    _assert_same_state(latest_checkpoint(straight_run), latest_checkpoint(run))
    a, _ = load_generator(straight_run)
    b, _ = load_generator(run)
    for u, v in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(u, v, atol=1e-6, rtol=0)


def _epoch_means(run) -> dict[tuple[str, int], float]:
    """The ``epoch/*`` scalars of every event file of a run, by (tag, step)."""
    return {(v.tag, e.step): float(tf.make_ndarray(v.tensor)) for f in (run / "logs").glob("events.out.tfevents.*")
            for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value if v.tag.startswith("epoch/")}


def test_a_mid_epoch_resume_continues_the_epoch_means_and_picks_the_same_best_epoch(straight_run, tmp_path):
    # Keras resets its loss trackers when an epoch begins; a run resumed mid-epoch must continue the
    # interrupted epoch's means, or its epoch means, best_cycle_loss and generator_best.keras would differ.
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    ckpt_dir = run / "checkpoints"
    mid = str(ckpt_dir / "ckpt-26")  # epoch 3 holds steps 21..30: resume after 6 of its 10 steps
    assert tf.train.get_checkpoint_state(ckpt_dir).all_model_checkpoint_paths[0].endswith("ckpt-26")
    for later in ckpt_dir.glob("ckpt-[23][80].*"):
        later.unlink()
    tf.compat.v1.train.update_checkpoint_state(str(ckpt_dir), mid, all_model_checkpoint_paths=[mid])
    for path in [run / "generator.keras", *(run / "logs").glob("events.out.tfevents.*")]:
        path.unlink()
    done = CliRunner().invoke(cli, ["train", "--out", str(run), "--resume"])
    assert done.exit_code == 0, done.output
    assert _steps(done.output.splitlines())[0] == 27

    resumed = _epoch_means(run)
    straight = {key: value for key, value in _epoch_means(straight_run).items() if key[1] == STEPS}
    assert resumed.keys() == straight.keys() and len(straight) >= 4  # every loss of epoch 3, logged at step 30
    for key, value in straight.items():
        assert resumed[key] == pytest.approx(value, rel=1e-6, abs=0), key
    best = {p: tf.train.load_checkpoint(latest_checkpoint(p)).get_tensor("best_cycle_loss/.ATTRIBUTES/VARIABLE_VALUE")
            for p in (straight_run, run)}
    assert best[run] == pytest.approx(best[straight_run], rel=1e-6, abs=0)
    a, _ = load_generator(straight_run / "generator_best.keras")
    b, _ = load_generator(run / "generator_best.keras")
    for u, v in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(u, v, atol=1e-6, rtol=0)


# ----- what may change on resume ------------------------------------------------------------------

TINY = {"data": {"patch_size": 32, "stride": 16, "seed": None},
        "model": {"ngf": 4, "n_blocks": 1, "ndf": 4, "n_layers_d": 2},
        "train": {"batch_size": 2, "epochs": 1, "steps_per_epoch": 2, "checkpoint_every": 1, "image_every": 100,
                  "strategy": "default", "seed": None}}


@pytest.mark.parametrize("first, then", [("float32", "mixed_bfloat16"), ("mixed_bfloat16", "float32")])
def test_resume_in_the_other_precision(training_folders, tmp_path, first, then):
    """Checkpoints hold float32 weights whatever the precision: the other precision restores them bit for
    bit (a resume with nothing left to train saves exactly the checkpointed G_L) and trains on."""
    run = tmp_path / "run"
    cfg = Config.from_dict(TINY).override({"train": {"precision": first}})
    train(cfg, *training_folders, run, progress=False)
    tensors = _checkpoint_tensors(latest_checkpoint(run))
    weights = [t for name, t in tensors.items() if "/_trainable_variables/" in name]  # of all four networks
    assert len(weights) > 40 and {t.dtype for t in weights} == {np.dtype("float32")}
    other = cfg.override({"train": {"precision": then}})
    result = train(other, None, None, run, resume=True, progress=False)  # nothing left to train
    assert result.steps == 2 and result.history == []
    saved, _ = load_generator(run / "generator.keras")
    stored = {t.tobytes() for t in weights}
    assert len(saved.get_weights()) > 20 and all(np.asarray(w).tobytes() in stored for w in saved.get_weights())
    result = train(other.override({"train": {"epochs": 2}}), None, None, run, resume=True, progress=False)
    assert result.steps == 4 and np.isfinite(result.history[-1]["g_loss"])


def _resume(run, *flags):
    result = CliRunner().invoke(cli, ["train", "--out", str(run), "--resume", *flags])
    return result.exit_code, result.output.strip().splitlines()


def test_changed_settings_are_refused_by_name_but_more_epochs_and_null_seeds_continue(training_folders, tmp_path):
    """Also: --resume of a run stopped before its first checkpoint starts it from step 0."""
    lr, hr = training_folders
    run = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))  # null seeds: drawn at the start, kept in config.yaml and the checkpoint
    run.mkdir()
    Config.from_dict(TINY).save(run / "config.yaml")  # what a run killed before its first checkpoint leaves
    first = CliRunner().invoke(cli, ["train", "--config", str(config), "--lr-dir", str(lr), "--hr-dir", str(hr),
                                     "--out", str(run), "--resume"])  # nothing to restore: starts at step 0
    assert first.exit_code == 0, first.output
    assert "Trained 2 steps (1 epoch): " in first.output
    drawn = re.search(r"^Seeds drawn for this run \(set them to repeat it\): train\.seed (\d+), data\.seed (\d+)$",
                      first.output, re.M)
    seeds = {"train": int(drawn.group(1)), "data": int(drawn.group(2))}
    saved = yaml.safe_load((run / "config.yaml").read_text())  # the seeds it drew, not null: the run repeats
    assert {name: saved[name]["seed"] for name in seeds} == seeds
    again = CliRunner().invoke(cli, ["train", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0 and "Seeds drawn" not in again.output, again.output
    for w, v in zip(load_generator(run)[0].get_weights(), load_generator(tmp_path / "again")[0].get_weights(),
                    strict=True):
        np.testing.assert_array_equal(w, v)
    for flags, name in [(["--batch-size", "4"], "train.batch_size was 2"), (["--ngf", "8"], "model.ngf was 4"),
                        (["--steps-per-epoch", "3"], "train.steps_per_epoch was 2"),
                        (["--lambda-rec", "5"], "train.lambda_rec was 10.0"),
                        (["--stride", "8"], "data.stride was 16"),
                        (["--seed", "7"], f"train.seed is 7 now but this run used {seeds['train']}")]:
        code, lines = _resume(run, *flags)
        assert code == 1 and len(lines) == 1 and name in lines[0], lines
    fewer = tmp_path / "fewer"  # other data: one HR volume instead of two
    fewer.mkdir()
    os.symlink(hr / "case0.nii.gz", fewer / "case0.nii.gz")
    code, lines = _resume(run, "--hr-dir", str(fewer))
    assert code == 1 and len(lines) == 1 and "HR patches" in lines[0] and "trained with" in lines[0], lines

    code, lines = _resume(run, "--epochs", "2")  # no folders given: the run remembers them
    assert code == 0, lines
    assert any(line.startswith("Trained 4 steps (2 epochs)") for line in lines), lines
    assert not any("Seeds drawn" in line for line in lines)  # config.yaml holds them, as the checkpoint does

    saved = (run / "config.yaml").read_text()
    code, lines = _resume(run, "--epochs", "1")  # fewer than done: refused, and config.yaml not rewritten
    assert code == 1 and len(lines) == 1 and "train.epochs 1 is fewer than the 2 epochs" in lines[0], lines
    assert (run / "config.yaml").read_text() == saved


def test_a_resume_whose_data_moved_names_the_folder_and_the_flag_then_continues_from_the_new_place(
        training_folders, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(training_folders[0].parent, data)
    run = tmp_path / "run"
    train(Config.from_dict(TINY), data / "lr", data / "hr", run, progress=False)
    data.rename(tmp_path / "moved")
    code, lines = _resume(run, "--epochs", "2")
    assert code == 1 and lines == [f"Error: {data / 'lr'}: directory not found: it is this run's data folder in its "
                                   "config.yaml; if the data moved, give its new place with --lr-dir"], lines
    code, lines = _resume(run, "--epochs", "2", "--lr-dir", str(tmp_path / "moved" / "lr"),
                          "--hr-dir", str(tmp_path / "moved" / "hr"))
    assert code == 0 and any(line.startswith("Trained 4 steps (2 epochs)") for line in lines), lines


def test_a_checkpoint_list_that_is_empty_or_names_a_missing_checkpoint_is_refused_not_started_over(
        training_folders, tmp_path):
    run = tmp_path / "run"
    train(Config.from_dict(TINY), *training_folders, run, progress=False)
    state = run / "checkpoints" / "checkpoint"
    kept = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir() if p.name != "checkpoint"}
    for text, needle in [("", "names no checkpoint"), ('model_checkpoint_path: "ckpt-99"\n', "ckpt-99"),
                         ("not a checkpoint list\n", "names no checkpoint")]:
        state.write_text(text)
        code, lines = _resume(run, "--epochs", "2")
        assert code == 1 and len(lines) == 1 and lines[0].startswith(f"Error: {state}: ") and needle in lines[0], lines
        assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir() if p.name != "checkpoint"} == kept


def test_an_emptied_or_cut_config_yaml_is_refused_not_resumed_with_defaults(training_folders, tmp_path):
    run = tmp_path / "run"
    train(Config.from_dict(TINY), *training_folders, run, progress=False)
    kept = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    text = (run / "config.yaml").read_text()
    for damaged, missing in [("", "data/model/train sections"), (text[:text.index("\nmodel:")], "model/train sections"),
                             (text[:text.index("\ntrain:")], "train section")]:
        (run / "config.yaml").write_text(damaged)
        code, lines = _resume(run, "--epochs", "2")
        assert code == 1 and lines == [f"Error: {run / 'config.yaml'}: has no {missing}, which every run writes; "
                                       "restore this run's config.yaml or start a new run"], lines
        assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == kept


def test_more_epochs_are_refused_once_the_learning_rate_decays(training_folders, tmp_path):
    run = tmp_path / "run"
    cfg = Config.from_dict(TINY).override({"train": {"epochs": 2, "steps_per_epoch": 1, "decay_start_epoch": 1}})
    train(cfg, *training_folders, run, progress=False)
    code, lines = _resume(run, "--epochs", "3")
    assert code == 1 and len(lines) == 1 and "train.epochs was 2" in lines[0] and "decaying" in lines[0], lines


def test_a_hand_edited_config_or_other_scans_with_the_same_patch_counts_are_refused_by_the_checkpoint(
        training_folders, tmp_path):
    """config.yaml is a text file: the checkpoint itself records the settings and the data's statistics."""
    import nibabel as nib

    lr, hr = training_folders
    run = tmp_path / "run"
    train(Config.from_dict(TINY), lr, hr, run, progress=False)
    latest = latest_checkpoint(run)
    text = (run / "config.yaml").read_text()
    edited = yaml.safe_load(text)
    edited["train"]["lambda_rec"] = 5.0
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    code, lines = _resume(run, "--epochs", "2")
    assert code == 1 and lines == [f"Error: {latest}: train.lambda_rec was 10.0 when this run wrote this checkpoint "
                                   "and is 5.0 now (config.yaml was edited?); that changes what the resumed steps "
                                   "compute, so keep 10.0 or start a new run"], lines
    (run / "config.yaml").write_text(text)

    brighter = tmp_path / "brighter"  # the same anatomy at other intensities: the same patch counts
    brighter.mkdir()
    for path in sorted(hr.iterdir()):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32) * 2 + 100, img.affine), brighter / path.name)
    code, lines = _resume(run, "--epochs", "2", "--hr-dir", str(brighter))
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {run / 'config.yaml'}: the data now give HR intensities of mean "), lines
    assert "but this run was trained with a mean of" in lines[0] and "point --lr-dir/--hr-dir" in lines[0], lines
    assert (run / "config.yaml").read_text() == text

    code, lines = _resume(run, "--epochs", "2")  # the run's own settings and data continue
    assert code == 0 and any(line.startswith("Trained 4 steps (2 epochs)") for line in lines), lines

    older = tmp_path / "older"  # a checkpoint written before the settings were recorded
    tf.train.Checkpoint(run_facts=RunFacts(train_seed=1)).write(str(older / "ckpt"))
    assert read_run_settings(str(older / "ckpt")) is None
    assert read_run_settings(latest_checkpoint(run))["settings"]["train.lambda_rec"] == 10.0
