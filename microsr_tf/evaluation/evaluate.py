"""Evaluate what ``microsr-tf predict`` wrote, from files: checked inputs in, a report folder out, atomically.

:func:`plan_evaluation` opens and checks everything (no voxel is scored and nothing is written): the
predictions' folders and files, their grid against the LR scan's upsampled grid and the paired HR, the
HR set's pixel size and the output folder. :func:`evaluate_files` then scores bicubic upsampling and every
method with :func:`microsr_tf.evaluation.engine.evaluate` and writes the report into a hidden temporary
folder beside ``out_dir`` that is renamed into place at the end, so an interrupted run leaves nothing at
``out_dir``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import ConfigError, InputError
from ..files import default_mode
from ..inference.predict import NORMALIZE_MODES, input_stats
from ..preprocessing import IntensityStats, combine_stats, volume_stats
from ..volumes import Volume, find_volumes, in_plane_axes, nifti_stem, open_volume
from .engine import BICUBIC, TRUTH, Candidate, Evaluation, Progress, Settings, check_name, evaluate
from .grids import hr_box, lr_box
from .report import write_report
from .sources import BicubicVolume, Box, SubVolume

SPACING_TOLERANCE = 0.05  # relative in-plane spacing mismatch allowed between predictions, HR set and model


@dataclass
class PredictionFiles:
    """One method's outputs for the LR scan, as ``predict`` names them."""

    name: str
    folder: str
    mean: str
    var: str | None


@dataclass
class EvaluationPlan:
    """Everything checked and opened; :func:`run_plan` scores it."""

    lr: Volume
    lr_box: Box  # the LR voxels the predictions upsampled
    factors: tuple[float, float]
    axis: int
    hr_dir: str
    hr_volumes: list[Volume]
    predictions: list[PredictionFiles]
    means: list[Volume]
    variances: list[Volume | None]
    paired: Volume | None
    paired_box: Box | None
    out_dir: Path
    overwrite: bool
    model: str | None = None
    model_meta: dict | None = None
    normalize: str = "volume"  # how predict normalised the LR scan (its --normalize)


def parse_predictions(specs: Sequence[str]) -> dict[str, str]:
    """``["cyclegan=out/cg", ...]`` -> ``{"cyclegan": "out/cg"}``; ConfigError for bad syntax or duplicates."""
    found: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise ConfigError(f"--pred {spec!r}: expected NAME=DIR (a method name, '=', the folder predict wrote to)")
        check_name(name)
        if name in found:
            raise ConfigError(f"--pred: the name {name!r} is given twice ({found[name]} and {folder})")
        same = next((other for other in found if other.lower() == name.lower()), None)
        if same is not None:  # names become file names: X and x would collide on case-insensitive disks
            raise ConfigError(f"--pred: the names {same!r} and {name!r} differ only in case; their files would "
                              "collide on case-insensitive disks")
        found[name] = folder
    if not found:
        raise ConfigError("--pred: give at least one NAME=DIR")
    return found


def _spacing_differs(a: Sequence[float], b: Sequence[float]) -> bool:
    return any(abs(x - y) > SPACING_TOLERANCE * y for x, y in zip(a, b))


def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.4g}" for v in values)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory; choose a report folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(out, "already holds files (use --overwrite to replace it with the new report)")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(parent, "is not a writable folder; the report cannot be created under it")


def read_model_meta(model: str | os.PathLike) -> dict:
    """A model's metadata as ``predict`` reads it (run dir, ``.keras`` or SavedModel; no weights loaded)."""
    from ..export import META_FILE, find_version_dir
    from ..models.artifact import check_prediction_meta, generator_file, meta_path_for, read_meta

    version_dir = find_version_dir(model)
    meta_file = (version_dir / "assets.extra" / META_FILE if version_dir is not None
                 else Path(meta_path_for(generator_file(model))))
    meta = read_meta(meta_file, missing="missing: not a microsr-tf model (no model metadata)")
    check_prediction_meta(meta, meta_file)
    return meta


def plan_evaluation(lr: str | os.PathLike, hr_dir: str | os.PathLike, predictions: Mapping[str, str | os.PathLike],
                    out_dir: str | os.PathLike, paired_hr: str | os.PathLike | None = None,
                    model: str | os.PathLike | None = None, axis: int = -1, overwrite: bool = False,
                    normalize: str = "volume") -> EvaluationPlan:
    """Open and check every input; InputError/ConfigError (one line naming the file) for anything wrong.

    ``model`` and ``normalize`` say how ``predict`` mapped intensities, so bicubic gets the same mapping.
    """
    if not -3 <= axis <= 2:
        raise ConfigError(f"axis must be 0, 1 or 2, got {axis}")
    if normalize not in NORMALIZE_MODES:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {normalize!r}")
    if normalize == "model" and model is None:
        raise ConfigError("--normalize model needs --model: the LR statistics are stored with the model")
    axis %= 3
    out = Path(out_dir)
    if not predictions:
        raise ConfigError("no predictions to evaluate (give at least one NAME=DIR)")
    for name in predictions:
        check_name(name)
    _check_out_dir(out, overwrite)
    lr_vol = open_volume(lr)
    stem = nifti_stem(lr)
    hr_files = find_volumes(hr_dir)

    files, means, variances = [], [], []
    box = factors = None
    for name, folder in predictions.items():
        folder = Path(folder)
        if not folder.exists():
            raise InputError(folder, f"prediction folder of {name!r} not found")
        if not folder.is_dir():
            raise InputError(folder, f"prediction folder of {name!r} is not a directory")
        mean_path = folder / f"{stem}_mean.nii.gz"
        if not mean_path.exists():
            raise InputError(mean_path, f"missing: the posterior mean `microsr-tf predict` writes for {lr} "
                                        f"(is {folder} the --out-dir of a prediction of that scan?)")
        mean = open_volume(mean_path)
        var_path = folder / f"{stem}_var.nii.gz"
        var = open_volume(var_path) if var_path.exists() else None
        if var is not None and (var.shape != mean.shape or not np.allclose(var.affine, mean.affine, atol=1e-5)):
            raise InputError(var_path, f"shape {var.shape} or affine differs from its mean {mean_path} "
                                       f"(shape {mean.shape})")
        this_box, this_factors = lr_box(mean_path, mean.shape, mean.affine, lr, lr_vol.shape, lr_vol.affine, axis)
        if box is None:
            box, factors = this_box, this_factors
        elif this_box != box or mean.shape != means[0].shape:
            raise InputError(mean_path, f"covers LR voxels {this_box} (shape {mean.shape}) but {files[0].mean} covers "
                                        f"{box} (shape {means[0].shape}); predict every method on the same ROI")
        files.append(PredictionFiles(name, os.fspath(folder), os.fspath(mean_path),
                                     None if var is None else os.fspath(var_path)))
        means.append(mean)
        variances.append(var)

    a, b = in_plane_axes(axis)
    pred_spacing = (means[0].spacing[a], means[0].spacing[b])
    hr_volumes = []
    for path in hr_files:
        vol = open_volume(path)
        spacing = vol.in_plane_spacing(axis)
        if _spacing_differs(spacing, pred_spacing):
            raise InputError(path, f"in-plane spacing {_fmt(spacing)} mm differs from the predictions' "
                                   f"{_fmt(pred_spacing)} mm; realism and sharpness compare pixels of one size")
        hr_volumes.append(vol)

    paired = paired_box = None
    if paired_hr is not None:
        paired = open_volume(paired_hr)
        paired_box = hr_box(files[0].mean, means[0].shape, means[0].affine, paired_hr, paired.shape, paired.affine)

    meta = None
    if model is not None:
        meta = read_model_meta(model)
        model_spacing = tuple(float(v) for v in meta["hr_spacing"])
        if _spacing_differs(pred_spacing, model_spacing):
            raise InputError(model, f"was trained for HR spacing {_fmt(model_spacing)} mm but the predictions are at "
                                    f"{_fmt(pred_spacing)} mm")
        if normalize == "model" and not meta.get("lr_stats"):
            raise InputError(model, "stores no LR statistics, so predict cannot have used --normalize model")
    return EvaluationPlan(lr=lr_vol, lr_box=box, factors=factors, axis=axis, hr_dir=os.fspath(hr_dir),
                          hr_volumes=hr_volumes, predictions=files, means=means, variances=variances,
                          paired=paired, paired_box=paired_box, out_dir=out, overwrite=overwrite,
                          model=None if model is None else os.fspath(model), model_meta=meta, normalize=normalize)


def run_plan(plan: EvaluationPlan, settings: Settings | None = None, progress: Progress | None = None) -> Evaluation:
    """Score bicubic upsampling, every method and the references; nothing is written."""
    settings = dataclasses.replace(settings or Settings(), axis=plan.axis)
    lr_view = SubVolume(plan.lr, plan.lr_box)
    if plan.model_meta is not None:
        hr_stats = IntensityStats.from_dict(plan.model_meta["hr_stats"])
        lr_stats = input_stats(plan.lr, plan.axis, plan.factors, plan.model_meta, plan.normalize)
        mapping = (f"LR statistics ({plan.normalize}) -> [0, 1] -> the HR statistics of the model {plan.model}, "
                   "exactly as predict maps")
    else:
        hr_stats = combine_stats([volume_stats(v, axis=plan.axis) for v in plan.hr_volumes])
        lr_stats = input_stats(plan.lr, plan.axis, plan.factors, {}, "volume")
        mapping = ("LR statistics -> [0, 1] -> the pooled statistics of the HR set, which is what training stores as "
                   "the model's HR statistics when this HR set is the one it was trained on (pass --model to use "
                   "the model's own)")
    bicubic = BicubicVolume(lr_view, plan.factors, lr_stats, hr_stats, axis=plan.axis)
    candidates = [Candidate(BICUBIC, bicubic, origin=f"computed from {plan.lr.path}")]
    for files, mean, var in zip(plan.predictions, plan.means, plan.variances):
        candidates.append(Candidate(files.name, mean, var, origin=files.folder))
    paired_view = None
    if plan.paired is not None:
        paired_view = SubVolume(plan.paired, plan.paired_box)
        candidates.append(Candidate(TRUTH, paired_view, origin=os.fspath(plan.paired.path), reference=True))
    full = tuple((0, n) for n in plan.lr.shape)
    inputs = {
        "LR scan": os.fspath(plan.lr.path) + ("" if plan.lr_box == full else f" (voxels {_box(plan.lr_box)})"),
        "upsampling factors": _fmt(plan.factors),
        "HR set": f"{plan.hr_dir} ({len(plan.hr_volumes)} volumes)",
        "paired HR": "none" if plan.paired is None else os.fspath(plan.paired.path)
        + f" (voxels {_box(plan.paired_box)})",
        **{f"method {f.name}": f"{f.mean}" + (f" + {Path(f.var).name}" if f.var else " (no variance)")
           for f in plan.predictions},
        "bicubic intensity mapping": mapping,
    }
    return evaluate(lr_view, plan.factors, plan.hr_volumes, candidates, paired_hr=paired_view, settings=settings,
                    progress=progress, hr_label=plan.hr_dir, inputs=inputs)


def _box(box: Box) -> str:
    return ",".join(f"{lo}:{hi}" for lo, hi in box)


def evaluate_files(lr: str | os.PathLike, hr_dir: str | os.PathLike, predictions: Mapping[str, str | os.PathLike],
                   out_dir: str | os.PathLike, paired_hr: str | os.PathLike | None = None,
                   model: str | os.PathLike | None = None, settings: Settings | None = None, overwrite: bool = False,
                   normalize: str = "volume", progress: Progress | None = None) -> tuple[Evaluation, dict[str, str]]:
    """Check, score and write ``out_dir/report.md``, ``metrics.csv``, ``metrics.json`` and the figures.

    ``predictions`` maps method names to folders written by ``microsr-tf predict`` for ``lr``. Returns the
    evaluation and ``{file name: final path}``. The report folder appears complete or not at all.
    """
    settings = settings or Settings()
    plan = plan_evaluation(lr, hr_dir, predictions, out_dir, paired_hr=paired_hr, model=model, axis=settings.axis,
                           overwrite=overwrite, normalize=normalize)
    return run_and_write(plan, settings, progress)


def run_and_write(plan: EvaluationPlan, settings: Settings | None = None,
                  progress: Progress | None = None) -> tuple[Evaluation, dict[str, str]]:
    """:func:`run_plan`, then the report written to a temporary folder and renamed to ``plan.out_dir``."""
    out = plan.out_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", suffix=".partial", dir=out.parent))
    try:
        evaluation = run_plan(plan, settings, progress)
        written = write_report(evaluation, tmp)
        default_mode(tmp)
        for name in os.listdir(tmp):
            default_mode(tmp / name)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return evaluation, {name: os.fspath(out / name) for name in written}


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an existing report there is swapped out, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}-replaced-{secrets.token_hex(4)}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def stale_report_folders(out_dir: str | os.PathLike) -> list[str]:
    """Hidden temporary folders an interrupted evaluation left beside ``out_dir`` (safe to delete once no
    evaluation is writing there); a rerun never reads them."""
    out = Path(out_dir)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}-(.+\.partial|replaced-[0-9a-f]+)")
    return sorted(os.fspath(p) for p in out.parent.iterdir() if p.is_dir() and pattern.fullmatch(p.name))
