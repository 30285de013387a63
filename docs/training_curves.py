"""Plot a training run's TensorBoard scalars (epoch means) into a small PNG.

    python docs/training_curves.py RUN_DIR OUT.png

Reads the event files under RUN_DIR/logs with TensorBoard's own reader, so the figure shows exactly
what TensorBoard shows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of every scalar in the event files of ``log_dir``."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for tag in acc.Tags().get("scalars", []):
        out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for tag in acc.Tags().get("tensors", []):  # TF2 summaries are stored as tensors
        events = acc.Tensors(tag)
        if events and not events[0].tensor_proto.tensor_shape.dim:
            from tensorflow.python.framework import tensor_util  # noqa: PLC0415
            out[tag] = [(e.step, float(tensor_util.MakeNdarray(e.tensor_proto))) for e in events]
    return out


def main(run_dir: str, png: str) -> None:
    data = scalars(Path(run_dir) / "logs")
    tags = sorted(t for t in data if t.startswith("step/") and t.endswith("_loss"))  # logged every log_every steps
    if not tags:
        sys.exit(f"{run_dir}: no loss scalars under logs/")
    cols = min(4, len(tags))
    rows = -(-len(tags) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat[len(tags):]:
        ax.axis("off")
    for ax, tag in zip(axes.flat, tags):
        steps, values = zip(*data[tag])
        ax.plot(steps, values, lw=1)
        ax.set_title(tag, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
