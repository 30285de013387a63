"""Test helper: read TensorBoard event files back."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import tensorflow as tf


def read_events(logdir: Path) -> list[tuple[int, str, object]]:
    """(step, tag, value) of every summary in the event files under ``logdir``, oldest file first."""
    out = []
    for path in sorted(glob.glob(str(logdir / "events.out.tfevents.*")), key=os.path.getmtime):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                out.append((event.step, value.tag, tf.make_ndarray(value.tensor)))
    return out
