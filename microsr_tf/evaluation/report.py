"""Write an :class:`~microsr_tf.evaluation.engine.Evaluation` as ``report.md``, ``metrics.csv``,
``metrics.json`` and PNG figures into a folder (the caller makes the folder appear atomically)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from . import plots
from .engine import HELD_OUT, TRUTH, Evaluation

REPORT = "report.md"
CSV = "metrics.csv"
JSON = "metrics.json"
DIRECTIONS = {"↑": "higher is better", "↓": "lower is better", "→1": "closer to 1 is better",
              "ref": "a yardstick, not a score"}


def _fmt(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}f}"


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def montage_name(method: str) -> str:
    return f"montage_{method}.png"


def _figures(evaluation: Evaluation, directory: Path) -> list[tuple[str, str]]:
    """Draw every figure into ``directory``; return (file name, caption) pairs."""
    written = []
    for row in evaluation.rows:
        if row.montage:
            name = montage_name(row.name)
            plots.montage(row, directory / name)
            written.append((name, f"{row.name}: LR | {row.name} | HR | uncertainty on the same slices"))
    with_unc = [r for r in evaluation.rows if r.sparsification is not None]
    if with_unc:
        plots.calibration(with_unc, directory / "calibration.png")
        written.append(("calibration.png", "uncertainty calibration: binned predicted std against observed RMSE"))
        plots.sparsification(with_unc, directory / "sparsification.png")
        written.append(("sparsification.png", "sparsification curves with oracle and random orderings (AUSE)"))
    plots.realism(evaluation, directory / "realism.png")
    written.append(("realism.png", "gradient-magnitude distributions over the bone against the HR set"))
    return written


def _markdown(evaluation: Evaluation, figures: list[tuple[str, str]]) -> str:
    cols = evaluation.columns
    s = evaluation.settings
    inputs = evaluation.inputs
    lines = ["# Evaluation report", ""]
    if inputs:
        lines += ["## Inputs", ""]
        lines += [f"- **{key}**: {value}" for key, value in inputs.items()]
        lines.append("")
    hr = evaluation.hr_set
    lines += [
        f"HR set: {len(hr['volumes'])} volume(s), {hr['slices']} slices ({hr['slices_with_shape']} with a segmented "
        f"structure); its edge sharpness (99th percentile of gradient magnitude over the bone) is "
        f"{_fmt(hr['sharpness_p99'], 4)} and its periodic scores are {_fmt(hr['periodic_2px'], 2)} (2 px) and "
        f"{_fmt(hr['periodic_4px'], 2)} (4 px): the sharpness and periodic columns are relative to these.",
        "",
        f"Settings: Hu distance {s.hu_method}; bone threshold "
        + (f"{s.threshold:g} (HR units)" if s.threshold is not None else "Otsu per volume")
        + f"; LR PSF FWHM {s.lr_psf_fwhm:g} LR voxels" + (" (area averaging only)" if s.lr_psf_fwhm == 0 else "")
        + f"; seed {s.seed}.", "",
        "## Results", "",
        "| method | " + " | ".join(f"{c.heading} {c.direction}" for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for row in evaluation.rows:
        label = f"*{row.name}* (reference)" if row.reference else f"**{row.name}**"
        lines.append(f"| {label} | " + " | ".join(_fmt(row.values.get(c.key, math.nan), c.digits) for c in cols) + " |")
    lines += ["", "— : not applicable to that row. Reference rows are yardsticks, not competitors:"]
    names = {r.name for r in evaluation.rows}
    if TRUTH in names:
        lines.append(f"*{TRUTH}* is the aligned HR itself: what a perfect output would score on the unpaired "
                     "columns (its LR consistency is limited by the scanner's blur and noise, not by any method).")
    if HELD_OUT in names:
        lines.append(f"*{HELD_OUT}* scores each HR-set volume against the other HR-set volumes: how far real "
                     "micro-CT of one specimen is from that of others on the unpaired columns.")
    lines += ["", "## Columns", "", "| column | direction | meaning |", "|---|---|---|"]
    lines += [f"| {c.heading} (`{c.key}`) | {c.direction} {DIRECTIONS[c.direction]} | {c.meaning} |" for c in cols]
    notes = [f"- **{r.name}**: {note}" for r in evaluation.rows for note in r.notes]
    if notes:
        lines += ["", "## Notes", ""] + notes
    lines += ["", "## Figures", ""]
    for name, caption in figures:
        lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    lines += [f"Numbers: `{CSV}` (one row per method) and `{JSON}` (with settings, inputs and curves).", ""]
    return "\n".join(lines)


def _csv(evaluation: Evaluation) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = [c.key for c in evaluation.columns]
    writer.writerow(["method", "kind"] + keys)
    for rec in evaluation.table():
        writer.writerow([rec["method"], rec["kind"]] + ["" if math.isnan(rec[k]) else repr(float(rec[k])) for k in keys])
    return buf.getvalue()


def _json(evaluation: Evaluation, figures: list[tuple[str, str]]) -> str:
    rows = []
    for row in evaluation.rows:
        entry = {"method": row.name, "kind": "reference" if row.reference else "method", "origin": row.origin,
                 "n_slices": row.n_slices, "n_slices_with_shape": row.n_shapes, "notes": row.notes,
                 "values": {c.key: _json_number(row.values.get(c.key, math.nan)) for c in evaluation.columns}}
        if row.calibration is not None:
            entry["uncertainty_pixels"] = row.uncertainty_pixels
            entry["calibration"] = {"predicted_std": row.calibration[0].tolist(), "rmse": row.calibration[1].tolist()}
        if row.sparsification is not None:
            sp = row.sparsification
            entry["sparsification"] = {"fractions": sp.fractions.tolist(), "by_uncertainty": sp.by_uncertainty.tolist(),
                                       "oracle": sp.oracle.tolist(), "random": sp.random.tolist()}
        rows.append(entry)
    hr = {k: _json_number(v) for k, v in evaluation.hr_set.items() if k != "gradients"}
    data = {
        "columns": [{"key": c.key, "heading": c.heading, "direction": c.direction, "meaning": c.meaning}
                    for c in evaluation.columns],
        "rows": rows, "hr_set": hr, "paired": evaluation.paired,
        "settings": dataclasses.asdict(evaluation.settings), "inputs": evaluation.inputs,
        "figures": [name for name, _ in figures],
    }
    return json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"


def write_report(evaluation: Evaluation, directory: str | os.PathLike) -> dict[str, str]:
    """Write the report files into the existing folder ``directory``; return ``{file name: path}``."""
    directory = Path(directory)
    figures = _figures(evaluation, directory)
    texts = {REPORT: _markdown(evaluation, figures), CSV: _csv(evaluation), JSON: _json(evaluation, figures)}
    for name, text in texts.items():
        (directory / name).write_text(text, encoding="utf-8")
    return {name: os.fspath(directory / name) for name in [*texts, *(n for n, _ in figures)]}

