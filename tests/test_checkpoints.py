"""The checkpoint ring: the state file only ever names complete checkpoints, whatever moment a kill lands on.

A kill is placed before each file-system change the ring makes from Python (an audit hook sees every
open for writing, rename and removal, and ends the process with ``os._exit`` before it happens), in a
subprocess, and the files left behind are read with TensorFlow's own checkpoint reader.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from microsr_tf.training.checkpoints import CheckpointRing

KEY = "v/.ATTRIBUTES/VARIABLE_VALUE"

# Saves steps 1 and 2 (value = 10 x step), then, with the kill armed, either step 3 (the ring, keeping two,
# drops ckpt-1) or step 2 again with the value 99 (a new best at an already saved step).
SCRIPT = textwrap.dedent("""
    import os, sys
    import tensorflow as tf
    from microsr_tf.training.checkpoints import CheckpointRing

    directory, scenario, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    v = tf.Variable(0.0)
    ring = CheckpointRing(tf.train.Checkpoint(v=v), directory, keep=2)
    for step in (1, 2):
        v.assign(10.0 * step)
        ring.save(step)
    changes = 0

    def hook(event, args):
        global changes
        writing = event == "open" and (isinstance(args[1], str) and set(args[1]) & set("wax+")
                                       or isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR))
        if writing or event in ("os.rename", "os.remove", "tempfile.mkstemp"):
            changes += 1
            if changes == kill_at:
                os._exit(9)

    v.assign(30.0 if scenario == "next" else 99.0)
    sys.addaudithook(hook)
    ring.save(3 if scenario == "next" else 2)
    print(changes)
""")


def _run(directory, scenario: str, kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(directory), scenario, str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=120)


def _listed(directory) -> list[str]:
    state = tf.train.get_checkpoint_state(str(directory))
    assert state is not None and state.model_checkpoint_path == state.all_model_checkpoint_paths[-1]
    return list(state.all_model_checkpoint_paths)


@pytest.mark.parametrize("scenario, newest, allowed", [
    ("next", ("ckpt-2", "ckpt-3"), {"ckpt-1": 10, "ckpt-2": 20, "ckpt-3": 30}),
    ("again", ("ckpt-1", "ckpt-2"), {"ckpt-1": 10, "ckpt-2": (20, 99)})])
def test_a_kill_before_any_file_change_of_a_save_leaves_every_listed_checkpoint_whole(tmp_path, scenario, newest,
                                                                                      allowed):
    finished = _run(tmp_path / "whole", scenario, 0)  # never killed: counts the changes of one save
    assert finished.returncode == 0, finished.stderr
    changes = int(finished.stdout.split()[-1])
    assert changes >= 2  # at least the state file's temporary and its rename
    for kill_at in range(1, changes + 1):
        directory = tmp_path / f"kill{kill_at}"
        killed = _run(directory, scenario, kill_at)
        assert killed.returncode == 9, killed.stderr
        listed = _listed(directory)
        names = [os.path.basename(p) for p in listed]
        assert names[-1] in newest  # at most the interrupted save is lost
        for path, name in zip(listed, names):
            value = float(tf.train.load_checkpoint(path).get_tensor(KEY))  # every listed checkpoint reads whole
            assert value in np.atleast_1d(allowed[name]), (kill_at, name, value)
        # the next run continues the list and clears what the kill left unlisted behind the oldest
        v = tf.Variable(40.0)
        ring = CheckpointRing(tf.train.Checkpoint(v=v), directory, keep=2)
        ring.save(4)
        assert [os.path.basename(p) for p in _listed(directory)] == [names[-1], "ckpt-4"]
        older = [f for f in os.listdir(directory) if f.startswith("ckpt-") and int(f[5:].split(".")[0]) < int(names[-1][5:])]
        assert not older, older


def test_the_ring_keeps_the_newest_checkpoints_with_their_values_and_relative_names(tmp_path):
    v = tf.Variable(0.0)
    ring = CheckpointRing(tf.train.Checkpoint(v=v), tmp_path / "run", keep=3)
    for step in (5, 10, 15, 20, 25):
        v.assign(float(step) / 2)
        ring.save(step)
    assert [os.path.basename(p) for p in _listed(tmp_path / "run")] == ["ckpt-15", "ckpt-20", "ckpt-25"]
    assert sorted(os.listdir(tmp_path / "run")) == sorted(
        ["checkpoint"] + [f"ckpt-{s}.{ext}" for s in (15, 20, 25) for ext in ("index", "data-00000-of-00001")])
    state_text = (tmp_path / "run" / "checkpoint").read_text()
    assert str(tmp_path) not in state_text  # relative names: a moved run folder still resumes
    os.rename(tmp_path / "run", tmp_path / "moved")
    for path in _listed(tmp_path / "moved"):
        step = int(path.rsplit("-", 1)[1])
        assert float(tf.train.load_checkpoint(path).get_tensor(KEY)) == step / 2
    restored = tf.Variable(0.0)
    status = tf.train.Checkpoint(v=restored).restore(_listed(tmp_path / "moved")[-1])
    status.assert_existing_objects_matched()  # the save counter is written as Checkpoint.save writes it
    assert float(restored.numpy()) == 12.5


def test_the_ring_continues_a_run_written_by_tensorflows_checkpoint_manager(tmp_path):
    # runs written by earlier versions used tf.train.CheckpointManager: resuming one continues its list
    v = tf.Variable(0.0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), str(tmp_path), max_to_keep=3)
    for step in (1, 2, 3):
        v.assign(float(step))
        manager.save(checkpoint_number=step)
    ring = CheckpointRing(tf.train.Checkpoint(v=v), tmp_path, keep=3)
    assert [os.path.basename(p) for p in ring.checkpoints] == ["ckpt-1", "ckpt-2", "ckpt-3"]
    v.assign(4.0)
    ring.save(4)
    assert [os.path.basename(p) for p in _listed(tmp_path)] == ["ckpt-2", "ckpt-3", "ckpt-4"]
    assert not list(tmp_path.glob("ckpt-1.*"))
    restored = tf.Variable(0.0)
    tf.train.Checkpoint(v=restored).restore(str(tmp_path / "ckpt-2")).assert_existing_objects_matched()
    assert float(restored.numpy()) == 2.0


def test_a_state_pointed_back_by_hand_continues_from_that_checkpoint(tmp_path):
    # the resume message tells a user to name an existing checkpoint in the state file: the run continues from
    # it, and the later checkpoints (an abandoned future) are no longer listed as newer than it
    v = tf.Variable(0.0)
    ring = CheckpointRing(tf.train.Checkpoint(v=v), tmp_path, keep=3)
    for step in (1, 2, 3):
        ring.save(step)
    text = (tmp_path / "checkpoint").read_text().replace('model_checkpoint_path: "ckpt-3"',
                                                         'model_checkpoint_path: "ckpt-2"')
    (tmp_path / "checkpoint").write_text(text)
    ring = CheckpointRing(tf.train.Checkpoint(v=v), tmp_path, keep=3)
    assert ring.latest_checkpoint == str(tmp_path / "ckpt-2")
    ring.save(3)
    assert [os.path.basename(p) for p in _listed(tmp_path)] == ["ckpt-1", "ckpt-2", "ckpt-3"]
