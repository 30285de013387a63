"""Plot the perception–distortion trade-off from `microsr-tf evaluate` reports into a small PNG.

    python docs/perception_distortion.py OUT.png PANEL_TITLE=LABEL=REPORT/metrics.csv:METHOD ...

Each argument is one point: the method's row of an evaluation's ``metrics.csv``, placed in the panel
named before the first ``=``. Labels starting with "λ" are joined by a line in the order given (give
them in the order of the weight); the others are reference points. Distortion is the calibrated SSIM against the paired truth (higher is
more faithful); perception is the realism metric GLCM W1 against the HR set (lower looks more like
micro-CT). Blau & Michaeli (CVPR 2018) show no method can reach both ends at once; the curve shows
where the adversarial weight moves a model between them.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

X, Y = "ssim_cal", "glcm_w1"


def read_point(spec: str) -> tuple[str, str, float, float]:
    """``PANEL=LABEL=CSV:METHOD`` -> (panel, label, SSIM cal, GLCM W1)."""
    panel, label, where = spec.split("=", 2)
    path, method = where.rsplit(":", 1)
    with open(path, newline="", encoding="utf-8") as fh:
        row = next((r for r in csv.DictReader(fh) if r["method"] == method), None)
    if row is None:
        raise SystemExit(f"{path}: no row for method {method!r}")
    return panel, label, float(row[X]), float(row[Y])


def main(out: str, specs: list[str]) -> None:
    panels: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    for spec in specs:
        panel, label, x, y = read_point(spec)
        panels[panel].append((label, x, y))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels.items()):
        curve = [p for p in points if p[0].startswith("λ")]  # in the order given: the weight's order
        ax.plot([p[1] for p in curve], [p[2] for p in curve], "-o", color="tab:blue", label="CycleGAN, λ_adv")
        for label, x, y in points:
            if label.startswith("λ"):
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, -3), fontsize=8)
            else:
                ax.plot(x, y, "s", color="tab:gray")
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8, color="dimgray")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("SSIM, calibrated, vs truth (more faithful →)")
        ax.set_ylabel("GLCM W1 vs micro-CT (← more realistic)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
