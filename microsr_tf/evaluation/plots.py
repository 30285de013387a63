"""PNG figures of an evaluation (matplotlib, Agg backend): montages, calibration, sparsification, realism."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .engine import HELD_OUT, Evaluation, Row  # noqa: E402

DPI = 110


def _save(fig, path: str | os.PathLike) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _blank(ax, text: str) -> None:
    ax.set_facecolor("0.92")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, transform=ax.transAxes, wrap=True)


def montage(row: Row, path: str | os.PathLike) -> None:
    """Rows = slices; columns LR | the method | HR (aligned, or the HR-set slice closest in shape) |
    predicted std. Output and HR share one grey scale (the HR's [0, 1]), so calibration shows too."""
    panels = row.montage
    fig, axes = plt.subplots(len(panels), 4, figsize=(12, 3.1 * len(panels)), squeeze=False)
    titles = ("LR input", row.name, "HR", "uncertainty (std)")
    for r, panel in enumerate(panels):
        ax_lr, ax_out, ax_hr, ax_std = axes[r]
        ax_lr.imshow(np.clip(panel.lr, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax_out.imshow(np.clip(panel.output, 0, 1), cmap="gray", vmin=0, vmax=1)
        if panel.hr is not None:
            ax_hr.imshow(np.clip(panel.hr, 0, 1), cmap="gray", vmin=0, vmax=1)
        else:
            _blank(ax_hr, "no HR slice to show")
        if panel.std is not None:
            top = float(np.percentile(panel.std, 99.5)) or 1.0
            im = ax_std.imshow(panel.std, cmap="inferno", vmin=0, vmax=top)
            fig.colorbar(im, ax=ax_std, fraction=0.046, pad=0.02, label="HR units")
        else:
            _blank(ax_std, "no variance")
        labels = (f"{titles[0]} (slice {panel.index})", titles[1], panel.hr_label or titles[2], titles[3])
        for ax, label in zip(axes[r], labels):
            ax.set_title(label, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    _save(fig, path)


def calibration(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Binned predicted std against observed RMSE, one line per method, with the diagonal."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    top = 0.0
    for row in rows:
        std, rmse = row.calibration
        ax.plot(std, rmse, "o-", label=row.name)
        top = max(top, float(np.max(std)), float(np.max(rmse)))
    ax.plot([0, top], [0, top], "k--", lw=1, label="calibrated")
    ax.set_xlabel("predicted std (RMS per bin, HR [0, 1] scale)")
    ax.set_ylabel("observed RMSE")
    ax.set_title("Uncertainty calibration")
    ax.legend(fontsize=8)
    _save(fig, path)


def sparsification(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Sparsification curves (by predicted std, oracle, random) per method, AUSE in the legend."""
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        sp = row.sparsification
        ax.plot(sp.fractions, sp.by_uncertainty, label=f"by predicted std (AUSE {sp.ause:.3f})")
        ax.plot(sp.fractions, sp.oracle, "k--", label="oracle (by true error)")
        ax.plot(sp.fractions, sp.random, color="0.6", label=f"random (AUSE {sp.ause_random:.3f})")
        ax.set_xlabel("fraction of pixels removed")
        ax.set_ylabel("mean absolute error left (normalised)")
        ax.set_title(row.name)
        ax.legend(fontsize=8)
    _save(fig, path)


def realism(evaluation: Evaluation, path: str | os.PathLike) -> None:
    """Distributions of gradient magnitude over the bone: the HR set against every row but the held-out
    HR reference (which is the HR set itself)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    hr = evaluation.hr_set["gradients"]
    top = float(np.percentile(hr, 99.9)) if len(hr) else 1.0
    for row in evaluation.rows:
        if row.gradients is not None and len(row.gradients):
            top = max(top, float(np.percentile(row.gradients, 99.9)))
    bins = np.linspace(0, top, 60)
    ax.hist(hr, bins=bins, density=True, histtype="stepfilled", color="0.8", label="HR set")
    for row in evaluation.rows:
        if row.name != HELD_OUT and row.gradients is not None and len(row.gradients):
            ax.hist(row.gradients, bins=bins, density=True, histtype="step", lw=1.4, label=row.name)
    ax.set_yscale("log")
    ax.set_xlabel("gradient magnitude (normalised intensity per pixel)")
    ax.set_ylabel("density")
    ax.set_title("Local statistics: gradient magnitude over the bone")
    ax.legend(fontsize=8)
    _save(fig, path)
