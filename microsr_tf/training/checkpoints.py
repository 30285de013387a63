"""The run's checkpoint files: ``ckpt-STEP`` prefixes and the ``checkpoint`` state file listing them.

TensorFlow's ``CheckpointManager`` records the state (still listing the oldest checkpoint), deletes that
checkpoint's files, then records the state again: a kill between the two leaves the state naming a
checkpoint whose files are gone. :class:`CheckpointRing` orders the steps so that the state file only
ever names complete checkpoints, whatever moment a kill (SIGKILL, power loss) lands on.
"""

from __future__ import annotations

import glob
import math
import os

import tensorflow as tf

from microsr_tf.files import atomic_write_text, remove_quietly

STATE_FILE = "checkpoint"


class CheckpointRing:
    """Writes ``DIR/ckpt-STEP`` and keeps the newest ``keep`` of them listed in ``DIR/checkpoint``.

    Each save: (1) when ``ckpt-STEP`` is already listed (a second save at the same step), rewrite the
    state without it; (2) write the checkpoint's files; (3) rewrite the state (one atomic rename) with
    the new checkpoint as the newest and without the ones beyond ``keep``; (4) only then delete those
    files. A kill during (2) leaves the state naming the earlier checkpoints only, one during (4) leaves
    unlisted files behind, never a listed checkpoint without its files.
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, directory: str | os.PathLike, keep: int):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.checkpoint = checkpoint
        self.directory = os.fspath(directory)
        self.keep = int(keep)
        state = tf.train.get_checkpoint_state(self.directory)
        listed = []
        if state is not None and state.model_checkpoint_path:
            # a resumed run continues from the state's newest: later entries are a future abandoned by hand
            newest = state.model_checkpoint_path
            listed = [p for p in state.all_model_checkpoint_paths if p != newest and _step(p) < _step(newest)]
            listed.append(newest)
        # entries whose files are gone (swept by an older writer) drop out
        self._paths = [p for p in listed if os.path.exists(p + ".index")]
        self._remove_leftovers()

    @property
    def latest_checkpoint(self) -> str | None:
        """Prefix of the newest checkpoint listed, or None before the first save."""
        return self._paths[-1] if self._paths else None

    @property
    def checkpoints(self) -> list[str]:
        """Prefixes of the listed checkpoints, oldest first."""
        return list(self._paths)

    def save(self, step: int) -> str:
        """Write the checkpoint of ``step``, list it as the newest, drop the oldest beyond ``keep``."""
        path = os.path.join(self.directory, f"ckpt-{int(step)}")
        if path in self._paths:
            self._paths.remove(path)
            self._record()
        self.checkpoint.save_counter.assign_add(1)  # as Checkpoint.save does: runs written either way restore alike
        written = self.checkpoint.write(path)
        kept = (self._paths + [written])[-self.keep:]
        dropped = [p for p in self._paths if p not in kept]
        self._paths = kept
        self._record()
        for prefix in dropped:
            remove_quietly(prefix + ".index", *glob.glob(glob.escape(prefix) + ".data-?????-of-?????"))
        return written

    def _remove_leftovers(self) -> None:
        """Delete the files of unlisted checkpoints older than the oldest listed (a kill during a deletion)."""
        if not self._paths:
            return
        oldest = _step(self._paths[0])
        for name in glob.glob(os.path.join(glob.escape(self.directory), "ckpt-*")):
            if _step(name.split(".", 1)[0]) < oldest:
                remove_quietly(name)

    def _record(self) -> None:
        """Rewrite the state file in one rename; names are relative, so a moved run folder still resumes."""
        state = os.path.join(self.directory, STATE_FILE)
        if not self._paths:
            remove_quietly(state)
            return
        names = [os.path.basename(p) for p in self._paths]
        lines = [f'model_checkpoint_path: "{names[-1]}"', *(f'all_model_checkpoint_paths: "{n}"' for n in names)]
        atomic_write_text(state, "\n".join(lines) + "\n")


def _step(prefix: str) -> float:
    """N of a ``.../ckpt-N`` prefix; infinity for any other name (never taken for an older checkpoint)."""
    name = os.path.basename(prefix)
    return int(name[5:]) if name.startswith("ckpt-") and name[5:].isdigit() else math.inf
