"""The end-to-end demo: a fresh phantom scan through the bundled model, evaluated as a user would evaluate.

The phantom's test subject is aligned voxel for voxel with its micro-CT rendering, so unlike the paper's
real pair it can be scored against a truth: ``microsr-tf evaluate``'s instrument runs on the posterior
mean and variance next to bicubic upsampling, with the phantom's unpaired micro-CT subject as the
reference set for m-HuM and realism, and the demo prints the headline figures.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import InputError
from .evaluation.engine import BICUBIC, TRUTH, Evaluation
from .evaluation.evaluate import plan_evaluation, run_and_write
from .export import load_model
from .files import atomic_write_text
from .inference.predict import predict_volume
from .phantoms import write_phantoms
from .volumes import open_volume

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "saved_models" / "microsr_phantom_adult"
DEMO_SIZE = "adult"  # the phantom size the bundled model was trained on (0.48 -> 0.06 mm in-plane)
DEMO_SEED = 2021  # phantom subjects the bundled model never saw (it was trained on seed 0)
METHOD = "microsr"  # the model's row in the evaluation
HEADLINE = (  # (column key, label, direction) printed by the demo, in this order
    ("mhum", "shape: m-HuM (paper eq. 5)", "lower is better"),
    ("hum_paired", "shape: Hu distance to the truth, same slice", "lower is better"),
    ("ssim_cal", "fidelity: SSIM after per-slice calibration", "higher is better"),
    ("psnr_cal", "fidelity: PSNR after per-slice calibration (dB)", "higher is better"),
    ("grad_w1", "realism: gradient distribution distance to micro-CT", "lower is better"),
    ("sharpness", "realism: edge sharpness relative to micro-CT", "closer to 1 is better"),
    ("periodic_2px", "artefacts: period-2 px spectral peak over micro-CT's", "lower is better"),
    ("unc_spearman", "uncertainty: Spearman(std, |error|)", "higher is better"),
    ("unc_ause", "uncertainty: AUSE (sparsification error)", "lower is better"),
    ("unc_ause_random", "uncertainty: AUSE of a random ordering", "the yardstick"),
)


@dataclass
class DemoReport:
    """What the demo measured; also written as ``report.json`` in the output directory."""

    model: str
    input: str
    outputs: dict[str, str]
    samples: int
    slices: int
    seconds_phantom: float
    seconds_predict: float
    seconds_evaluate: float
    slices_per_s: float
    figures: dict[str, dict[str, float]]  # row name -> column key -> value (model, bicubic, truth)
    report_dir: str
    convergence: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        model, bicubic = self.figures.get(METHOD, {}), self.figures.get(BICUBIC, {})
        truth = self.figures.get(TRUTH, {})
        out = [f"model:   {self.model}",
               f"input:   {self.input} (a phantom subject the model never saw), {self.slices} slices",
               f"predict: T={self.samples} Monte Carlo samples, {self.seconds_predict:.1f} s "
               f"({self.slices_per_s:.2f} slices/s); evaluate: {self.seconds_evaluate:.1f} s",
               f"{'':<54} {'model':>8} {'bicubic':>8} {'truth':>8}"]
        for key, label, direction in HEADLINE:
            if key in model:
                out.append(f"{label:<54} {_num(model.get(key)):>8} {_num(bicubic.get(key)):>8} "
                           f"{_num(truth.get(key)):>8}  ({direction})")
        out.append(f"full report: {os.path.join(self.report_dir, 'report.md')}")
        out += [f"wrote {path}" for path in self.outputs.values()]
        return out


def _num(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.3f}"


def run_demo(out_dir: str | os.PathLike, model: str | os.PathLike | None = None, samples: int = 100,
             seed: int = 0, slices: int = 8, overwrite: bool = False,
             say: Callable[[str], None] = lambda m: None) -> DemoReport:
    """Phantom -> predict (mean, variance, preview) on ``slices`` central slices -> evaluate against the
    micro-CT twin -> the report; ``report.json`` and the evaluation folder ``report/`` are written."""
    out = Path(out_dir)
    model_path = Path(model) if model is not None else BUNDLED_MODEL
    if not model_path.exists():
        raise InputError(model_path, "model not found (the bundled model ships in saved_models/ of a source "
                                     "checkout; pass --model RUN_DIR|MODEL.keras|SAVEDMODEL)")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory; choose an output folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(out, "output directory is not empty (use --overwrite)")
    generator, meta = load_model(model_path)  # a model that cannot load leaves no output folder behind
    out.mkdir(parents=True, exist_ok=True)

    say("writing a phantom temporal bone (LR cone-beam CT, its micro-CT twin, and an unpaired micro-CT subject)")
    t0 = time.perf_counter()
    manifest = write_phantoms(out / "phantom", subjects=1, seed=DEMO_SEED + seed, size=DEMO_SIZE, overwrite=True)
    t_phantom = time.perf_counter() - t0
    lr_path = out / "phantom" / _role_file(manifest, "test_lr")
    hr_path = out / "phantom" / _role_file(manifest, "test_hr")
    n = open_volume(lr_path).shape[2]
    k0 = max(0, (n - slices) // 2)
    roi = ((None, None), (None, None), (k0, min(n, k0 + slices)))

    say(f"predicting the posterior mean and variance of {slices} slices with T={samples} Monte Carlo samples")
    prediction = out / "prediction"
    result = predict_volume(lr_path, generator, meta, prediction, samples=samples, seed=seed, roi=roi, preview=True)

    say("evaluating against the micro-CT twin, next to bicubic upsampling")
    t0 = time.perf_counter()
    plan = plan_evaluation(lr_path, out / "phantom" / "hr", {METHOD: prediction}, out / "report",
                           paired_hr=hr_path, model=model_path, overwrite=True)
    evaluation, _ = run_and_write(plan)
    report = DemoReport(
        model=str(model_path), input=str(lr_path), outputs=dict(result.outputs), samples=samples,
        slices=result.n_slices, seconds_phantom=t_phantom, seconds_predict=result.seconds,
        seconds_evaluate=time.perf_counter() - t0, slices_per_s=result.slices_per_s,
        figures=headline_figures(evaluation), report_dir=str(out / "report"), convergence=dict(result.convergence))
    atomic_write_text(out / "report.json", json.dumps(asdict(report), indent=2, allow_nan=True) + "\n")
    return report


def headline_figures(evaluation: Evaluation) -> dict[str, dict[str, float]]:
    """The headline columns of every row of an evaluation, by row name."""
    keys = [key for key, _, _ in HEADLINE]
    return {row["method"]: {k: float(row[k]) for k in keys if k in row} for row in evaluation.table()}


def _role_file(manifest: dict, role: str) -> str:
    return next(f["path"] for f in manifest["files"] if f["role"] == role)
