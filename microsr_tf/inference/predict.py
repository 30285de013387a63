"""Whole-volume prediction: an LR volume in, posterior mean and variance NIfTI volumes out (paper eq. 4).

Each slice is read, resampled in-plane to the model's HR spacing and normalised with the volume's
statistics (as in training), predicted with Monte Carlo dropout plus stitching, mapped back to HR
units and written at once, so peak memory does not grow with the number of slices. A scan at another
in-plane spacing than the model's LR scans is refused, or, with ``resample_input``, first resampled
to that spacing (:class:`InputResampling`).
"""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np

from ..config import INFERENCE_PRECISIONS, MAX_SEED
from ..errors import ConfigError, InputError
from ..files import remove_quietly, replace_together, temp_file_beside
from ..preprocessing import IntensityStats, check_coarser, resample_slice, volume_stats
from ..volumes import (Volume, VolumeWriter, make_output_dir, nifti_stem, open_volume, resampled_affine,
                       resampled_shape)
from ..models.generator import DOWNSCALE
from .mc import AutoSamples, MCResult, MonteCarloPredictor, is_deterministic, resolve_samples
from .stitching import MODES as STITCH_MODES
from .stitching import predict_slice

FACTOR_TOLERANCE = 0.05  # relative mismatch allowed between the input's and the model's scale factors
FEATURELESS_SPAN = 1e-6  # a normalised slice whose values span no more than this holds nothing to resolve

META_KEYS = ("hr_spacing", "factors", "hr_stats")  # what prediction reads from the model's metadata

Roi = Sequence[tuple[int | None, int | None]]
Progress = Callable[[int, int, float], None]
SliceEngine = Callable[[np.ndarray, int], MCResult]  # (normalised HR-grid slice, slice seed) -> posterior


@dataclass(frozen=True)
class InputResampling:
    """A scan brought from its own in-plane spacing to the model's LR spacing before super-resolution.

    Bicubic (Keys, a = -0.5) on edge-aligned grids, as :func:`~microsr_tf.preprocessing.resample_slice`;
    an axis that gets coarser is anti-aliased by the kernel stretched by the coarsening ratio.
    """

    from_spacing: tuple[float, float]  # the scan's in-plane spacing, mm
    to_spacing: tuple[float, float]  # the model's trained LR in-plane spacing, mm

    @property
    def factors(self) -> tuple[float, float]:
        """Old / new spacing per in-plane axis: below 1 the axis is coarsened, above 1 refined."""
        return tuple(a / b for a, b in zip(self.from_spacing, self.to_spacing))

    def apply(self, slice2d: np.ndarray) -> np.ndarray:
        """One in-plane slice at the scan's spacing -> the same field of view at the model's LR spacing."""
        return resample_slice(slice2d, self.factors)

    def to_dict(self) -> dict[str, Any]:
        return {"from_spacing_mm": list(self.from_spacing), "to_spacing_mm": list(self.to_spacing),
                "factors": list(self.factors),
                "method": "Keys bicubic (a = -0.5), kernel stretched by the ratio on coarsened axes"}

    def description(self) -> str:
        """The NIfTI ``descrip`` of the outputs, shortened for spacings too long to fit its 80 characters."""
        src, dst = _fmt(self.from_spacing, "x"), _fmt(self.to_spacing, "x")
        for text in (f"microsr-tf: input {src} mm resampled to {dst} mm (bicubic)",
                     f"microsr-tf: input {src} mm resampled to {dst} mm", f"microsr-tf: input resampled to {dst} mm"):
            if len(text) <= 80:
                return text
        return "microsr-tf: input resampled to the model's LR spacing"


@dataclass(frozen=True)
class VolumePlan:
    """What will be predicted for one input: the opened volume, validated ROI and the output grid."""

    input_path: str
    name: str
    volume: Volume
    axis: int  # non-negative slice axis
    roi: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # half-open voxel ranges of the input
    factors: tuple[float, float]  # model LR grid -> HR grid
    out_shape: tuple[int, int, int]
    out_affine: np.ndarray
    resampling: InputResampling | None = None  # input grid -> model LR grid, when the spacings differ

    @property
    def slices(self) -> range:
        """Input slice indices to process, along ``axis``."""
        return range(*self.roi[self.axis])

    def lr_slice(self, raw: np.ndarray) -> np.ndarray:
        """An input slice (or its ROI) on the model's LR grid: resampled if planned, else as it is."""
        return raw if self.resampling is None else self.resampling.apply(raw)

    def stats_volume(self) -> Volume:
        """The volume the LR intensity statistics are taken from: the input as the network will see it."""
        return self.volume if self.resampling is None else _ResampledVolume(self.volume, self.axis, self.resampling)


class _ResampledVolume:
    """A read-only view of a volume whose slices along ``axis`` come resampled to the model's LR grid;
    it offers what :func:`~microsr_tf.preprocessing.volume_stats` reads (``path``, slices)."""

    def __init__(self, volume: Volume, axis: int, resampling: InputResampling):
        self.path, self._volume, self._axis, self._resampling = volume.path, volume, axis, resampling

    def n_slices(self, axis: int = -1) -> int:
        return self._volume.n_slices(axis)

    def iter_slices(self, axis: int = -1, indices=None):
        if axis % 3 != self._axis:
            raise ValueError(f"slices of a resampled view exist only along axis {self._axis}")
        for k, raw in self._volume.iter_slices(axis, indices):
            yield k, self._resampling.apply(raw)


@dataclass
class PredictResult:
    """Files written for one volume, how long it took, and how settled the Monte Carlo estimate is."""

    input_path: str
    outputs: dict[str, str]  # "mean", "var", optionally "std", "p5", ..., "preview" -> path
    shape: tuple[int, int, int]
    n_slices: int
    samples: int  # T; with samples="auto" the most any slice used
    seed: int  # base seed actually used; rerun with it to reproduce the files
    seconds: float
    slices_per_s: float
    convergence: dict[str, float] = field(default_factory=dict)
    resampling: dict[str, Any] | None = None  # InputResampling.to_dict() when the input was resampled
    slice_samples: tuple[int, ...] = ()  # T of each slice, in slice order (they differ with samples="auto")
    auto: bool = False  # whether the slices chose their own T (samples="auto")

    def summary(self) -> str:
        """One line: where the output went, speed, convergence and any input resampling."""
        conv = ", ".join(f"{k} {v:.3g}" for k, v in self.convergence.items())
        resampled = ""
        if self.resampling:
            resampled = (f"; input resampled from {_fmt(self.resampling['from_spacing_mm'])} mm to "
                         f"{_fmt(self.resampling['to_spacing_mm'])} mm")
        return (f"{os.path.basename(os.path.normpath(self.input_path))}: {self.n_slices} slices -> {self.shape} in "
                f"{self.seconds:.1f} s ({self.slices_per_s:.2f} slices/s), {self._samples_text()}, seed {self.seed}"
                + (f"; change from T/2 to T (worst slice): {conv}" if conv else "") + resampled)


    def _samples_text(self) -> str:
        if not self.auto or not self.slice_samples:
            return f"T={self.samples}"
        counts = np.asarray(self.slice_samples)
        spread = (f"{counts.min()}-{counts.max()} per slice, median {np.median(counts):g}, "
                  f"{counts.sum()} passes in all" if counts.min() < counts.max() else f"{counts[0]} for every slice")
        return f"T=auto ({spread})"


def output_paths(name: str, out_dir: str | os.PathLike, write_std: bool = False,
                 percentiles: Sequence[float] = (), preview: bool = False) -> dict[str, str]:
    """Final output paths for a volume ``name``, keyed by what they hold."""
    out_dir = os.fspath(out_dir)
    keys = ["mean", "var"] + (["std"] if write_std else []) + [_percentile_key(q) for q in percentiles]
    paths = {key: os.path.join(out_dir, f"{name}_{key}.nii.gz") for key in keys}
    if preview:
        paths["preview"] = os.path.join(out_dir, f"{name}_preview.png")
    return paths


def check_output_paths(paths: Sequence[str], inputs: Sequence[str]) -> None:
    """Refuse, before any work, output paths that a file could not be renamed onto (a folder in the way)
    or that are one of ``inputs`` (writing there would replace a scan still to be read)."""
    sources = {os.path.realpath(p) for p in inputs}
    for path in paths:
        if os.path.realpath(path) in sources:
            raise InputError(path, "is an input of this run and also where an output would be written; "
                                   "choose another --out-dir or rename the input")
        if os.path.isdir(path):
            raise InputError(path, "is a folder where this output file goes; move it or choose another --out-dir")


def slice_seed(seed: int, index: int) -> int:
    """A 31-bit seed for slice ``index`` that depends only on the base seed and the slice index."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0] >> 1)


def plan_volume(input_path: str | os.PathLike, meta: Mapping[str, Any], roi: Roi | None = None,
                axis: int | None = None, resample_input: bool = False) -> VolumePlan:
    """Open and check one input against the model's metadata; nothing is read or written yet.

    Raises InputError naming the file for an unreadable volume, a bad axis or ROI, an input that is
    not coarser than the model's HR spacing, or an input whose scale differs from the model's. With
    ``resample_input`` an input at another in-plane spacing than the model's LR spacing
    (``hr_spacing * factors``) is planned to be resampled to it first; the output grid is then the
    model's HR spacing over the input's field of view.
    """
    input_path = os.fspath(input_path)
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ConfigError(f"model metadata lacks {', '.join(missing)} (not a generator written by training?)")
    vol = open_volume(input_path)
    axis = meta.get("axis", -1) if axis is None else axis
    if not -3 <= axis <= 2:
        raise InputError(input_path, f"slice axis {axis} is out of range for a 3-D volume (use 0, 1 or 2)")
    axis %= 3
    roi = _check_roi(input_path, vol.shape, roi)

    lr_spacing = tuple(float(s) for s in vol.in_plane_spacing(axis))
    hr_spacing = tuple(float(s) for s in meta["hr_spacing"])
    trained = tuple(float(f) for f in meta["factors"])
    model_lr = tuple(h * t for h, t in zip(hr_spacing, trained))
    off_scale = any(abs(s / m - 1.0) > FACTOR_TOLERANCE for s, m in zip(lr_spacing, model_lr))
    hint = (f"use --resample-input (resample_input=True) to resample the scan to the model's LR spacing "
            f"{_fmt(model_lr)} mm first")
    resampling = None
    if resample_input and off_scale:
        resampling = InputResampling(lr_spacing, model_lr)
        factors = trained
    else:
        try:
            factors = tuple(float(f) for f in check_coarser(input_path, lr_spacing, hr_spacing))
        except InputError as exc:
            raise InputError(input_path, f"{exc.problem}; {hint}") from None
        if off_scale:
            raise InputError(
                input_path,
                f"in-plane spacing {_fmt(lr_spacing)} mm needs upsampling factors {_fmt(factors)} to the model's "
                f"{_fmt(hr_spacing)} mm, but the model was trained for factors {_fmt(trained)}; {hint}")

    roi_shape = tuple(hi - lo for lo, hi in roi)
    origin = np.asarray(vol.affine, dtype=np.float64).copy()
    origin[:3, 3] = origin[:3, :3] @ np.array([lo for lo, _ in roi], dtype=np.float64) + origin[:3, 3]
    if resampling is not None:  # the ROI's grid at the model's LR spacing, edges kept in place
        roi_shape = resampled_shape(roi_shape, axis, resampling.factors)
        origin = resampled_affine(origin, axis, resampling.factors)
    return VolumePlan(
        input_path=input_path, name=nifti_stem(os.path.abspath(input_path)), volume=vol, axis=axis, roi=roi,
        factors=factors, out_shape=tuple(int(n) for n in resampled_shape(roi_shape, axis, factors)),
        out_affine=np.asarray(resampled_affine(origin, axis, factors)), resampling=resampling)


def predict_volume(
    input_path: str | os.PathLike,
    generator: Any,
    meta: Mapping[str, Any],
    out_dir: str | os.PathLike,
    samples: int | str | AutoSamples = 100,
    seed: int | None = None,
    stitch: str = "whole",
    tile: int | None = None,
    memory_budget: float | str = "auto",
    roi: Roi | None = None,
    axis: int | None = None,
    write_std: bool = False,
    percentiles: Sequence[float] = (),
    preview: bool = False,
    progress: Progress | None = None,
    precision: str = "float32",
    normalize: str = "volume",
    engine: SliceEngine | None = None,
    resample_input: bool = False,
) -> PredictResult:
    """Super-resolve one LR volume into ``NAME_mean.nii.gz`` and ``NAME_var.nii.gz`` under ``out_dir``.

    ``generator`` is anything with the generator interface (``__call__(x, seed)``,
    ``deterministic_prefix``, ``stochastic_suffix``) and ``meta`` its training metadata. Slices are
    processed as in training: bicubic upsampling by the spacing ratio, then the volume's own
    intensity statistics to [0, 1]. The mean is in HR intensity units, the variance in their square.
    ``roi`` selects voxel ranges ``((i0, i1), (j0, j1), (k0, k1))`` of the input (``None`` ends mean
    the full extent; in-plane borders are replicated, not read from outside the ROI); the output
    affine places that sub-volume in world space. Slice ``k`` always uses the dropout seed derived
    from ``(seed, k)``, so its result does not depend on which other slices are processed.
    ``samples`` is ``T``, or ``"auto"`` (an :class:`~microsr_tf.inference.mc.AutoSamples`) to sample each
    slice until its posterior has converged, at most 100 times; ``PredictResult.slice_samples`` records
    each slice's ``T``. ``precision="bfloat16"`` runs the generator's convolutions in bfloat16 (faster on CPUs with AMX).
    ``stitch`` is ``"whole"`` (the exact whole-slice posterior) or ``"paper"`` (the paper's per-tile
    histogram matching and median filter on top of it); ``tile`` fixes the height of the stripes a local
    decoder runs in and ``memory_budget`` (MB or ``"auto"``) bounds the working memory -- neither changes
    the result, and a slice that cannot fit the budget is refused before any output is written.
    ``normalize`` chooses the LR intensity statistics (see :func:`input_stats`). ``engine`` replaces the
    local Monte Carlo posterior of one normalised HR-grid slice (``engine(slice, slice_seed) -> MCResult``,
    e.g. a TF-Serving client); everything else -- reading, resampling, normalising, seeds, units,
    writing -- stays the same, so the files equal a local run's when the engine computes the same.
    ``resample_input`` brings a scan at another in-plane spacing to the model's LR spacing first (see
    :func:`plan_volume`); the outputs' NIfTI description and ``PredictResult.resampling`` record it.
    """
    check_options(samples=samples, seed=seed, stitch=stitch, tile=tile, percentiles=percentiles,
                  precision=precision, normalize=normalize)
    plan = plan_volume(input_path, meta, roi=roi, axis=axis, resample_input=resample_input)
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint32)[0] >> 1)
    paths = output_paths(plan.name, out_dir, write_std, percentiles, preview)
    check_output_paths(list(paths.values()), [plan.input_path])
    if engine is None:
        predictor = MonteCarloPredictor(generator, samples=samples, percentiles=tuple(percentiles),
                                        precision=precision, memory_budget_mb=memory_budget, stripe=tile)
        predictor.require_fit(*(-(-n // DOWNSCALE) * DOWNSCALE for d, n in enumerate(plan.out_shape) if d != plan.axis))

        def engine(image: np.ndarray, slice_seed_: int) -> MCResult:
            predictor.seed = slice_seed_
            return predict_slice(predictor, image, mode=stitch)

    existed = os.path.isdir(out_dir)
    make_output_dir(out_dir)
    with ExitStack() as stack:
        if not existed:  # an input refused as it is read leaves no empty folder behind
            stack.push(lambda kind, exc, tb: _remove_empty(out_dir) if kind is not None else None)
        start = time.perf_counter()
        vol, ax, ks = plan.volume, plan.axis, plan.slices
        lr_stats = input_stats(plan.stats_volume(), ax, plan.factors, meta, normalize)
        hr_stats = IntensityStats.from_dict(meta["hr_stats"])
        (i0, i1), (j0, j1) = [r for d, r in enumerate(plan.roi) if d != ax]
        middle = ks[len(ks) // 2]
        panel = None
        convergence: dict[str, float] = {}
        slice_samples = []
        notes = _descriptions(plan, meta, generator)
        writers = {key: stack.enter_context(VolumeWriter(path, plan.out_shape, plan.out_affine, axis=ax,
                                                         header=vol.header, description=notes.get(key, notes[""])))
                   for key, path in paths.items() if key != "preview"}
        for done, (k, raw) in enumerate(vol.iter_slices(ax, ks), start=1):
            lr_up = lr_stats.normalize(resample_slice(plan.lr_slice(raw[i0:i1, j0:j1]), plan.factors))
            if is_featureless(lr_up):
                res = featureless_result(lr_up, slice_seed(seed, k), percentiles)
            else:
                res = engine(lr_up, slice_seed(seed, k))
            slice_samples.append(int(res.samples))
            for key, arr in _to_hr_units(res, hr_stats, write_std).items():
                writers[key].write_slice(k - ks.start, arr)
            for key, value in res.convergence.items():
                convergence[key] = max(value, convergence.get(key, value))
            if preview and k == middle:
                panel = preview_image(lr_up, res.mean, res.var)
            if progress is not None:
                progress(done, len(ks), time.perf_counter() - start)
        # Compress every output first, then rename them all at once: an interruption during the slow
        # part leaves the earlier outputs as they were rather than a new mean beside an old variance.
        moves = [(writer.finish(), writer.path) for writer in writers.values()]
        if panel is not None:
            fd, tmp = temp_file_beside(paths["preview"], ".png")
            stack.callback(remove_quietly, tmp)
            with os.fdopen(fd, "wb") as fh:
                fh.write(_png_bytes(paths["preview"], panel))
            moves.append((tmp, paths["preview"]))
        replace_together(moves)
    seconds = time.perf_counter() - start
    return PredictResult(
        input_path=plan.input_path, outputs=paths, shape=plan.out_shape, n_slices=len(ks),
        samples=max(slice_samples, default=resolve_samples(samples)[0]), seed=seed, seconds=seconds,
        slices_per_s=len(ks) / seconds if seconds > 0 else math.inf, convergence=convergence,
        resampling=plan.resampling.to_dict() if plan.resampling else None, slice_samples=tuple(slice_samples),
        auto=resolve_samples(samples)[1] is not None)


def _remove_empty(folder: str | os.PathLike) -> None:
    """Remove ``folder`` if it is empty (a folder this run created and wrote nothing into)."""
    with suppress(OSError):
        os.rmdir(folder)


def is_featureless(image: np.ndarray) -> bool:
    """Whether a normalised slice is constant (to :data:`FEATURELESS_SPAN`): padding outside a scan's
    field of view, or a slice that is all air below the normalisation's low end."""
    return float(np.max(image) - np.min(image)) <= FEATURELESS_SPAN


def featureless_result(image: np.ndarray, seed: int, percentiles: Sequence[float] = ()) -> MCResult:
    """The posterior of a featureless slice, without the network: the slice itself, variance 0, no passes.

    A constant slice carries nothing to super-resolve, and the generator's instance normalisation would
    turn it into the same mid-grey texture whatever its value (air, water and bone alike); the served
    signatures return the same (:mod:`microsr_tf.export`).
    """
    mean = np.asarray(image, np.float32)
    return MCResult(mean=mean, var=np.zeros_like(mean), samples=0, seed=seed,
                    percentiles={float(q): mean for q in percentiles} or None, image_samples=(0,))


NORMALIZE_MODES = ("volume", "model")


def input_stats(vol: Volume, axis: int, factors: Sequence[float], meta: Mapping[str, Any],
                normalize: str = "volume") -> IntensityStats:
    """Statistics that map an LR scan to the network's [0, 1] input, exactly as training mapped its scans.

    ``"volume"`` (the paper's per-scan z-score): the scan's own foreground statistics, the foreground
    drawn by the threshold training used (``meta["roi_threshold_lr"]``, else Otsu on the scan's native
    voxels) and the values taken from the resampled slices, as :mod:`microsr_tf.pipeline` does.
    ``"model"``: the pooled statistics of the training LR scans stored with the model, for a scan
    (or a single slice) too small to describe itself.
    """
    if normalize == "model":
        if not meta.get("lr_stats"):
            raise ConfigError("this model stores no LR statistics (a supervised baseline reads no LR voxels, "
                              "and models trained before they were recorded lack them); use normalize='volume'")
        return IntensityStats.from_dict(meta["lr_stats"])
    if normalize != "volume":
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {normalize!r}")
    return volume_stats(vol, axis=axis, threshold=meta.get("roi_threshold_lr"), factors=factors)


DETERMINISTIC_VARIANCE = "variance 0: deterministic {method} model, no MC dropout"


def _descriptions(plan: VolumePlan, meta: Mapping[str, Any], generator: Any) -> dict[str, str]:
    """NIfTI descriptions per output key ("" for all others): input resampling, and a deterministic
    model's zero variance said where it is written."""
    base = plan.resampling.description() if plan.resampling else ""
    notes = {"": base}
    if meta.get("deterministic") is True or is_deterministic(generator):
        zero = DETERMINISTIC_VARIANCE.format(method=meta.get("method", "dropout-free"))
        notes["var"] = notes["std"] = f"{zero}; {base}" if base else zero
    return notes


def _to_hr_units(res: MCResult, hr: IntensityStats, write_std: bool) -> dict[str, np.ndarray]:
    """Posterior maps of one slice from [0, 1] to HR intensity units (variance by ``scale**2``)."""
    out = {"mean": hr.denormalize(res.mean), "var": (res.var * hr.scale ** 2).astype(np.float32)}
    if write_std:
        out["std"] = (np.sqrt(res.var) * hr.scale).astype(np.float32)
    for q, p in (res.percentiles or {}).items():
        out[_percentile_key(q)] = hr.denormalize(p)
    return out


def stale_temp_files(name: str, out_dir: str | os.PathLike) -> list[str]:
    """Leftover temporary outputs for ``name`` in ``out_dir`` (from a killed run); safe to delete
    once no prediction is writing there. A rerun never reads or reuses them."""
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        return []
    pattern = re.compile(rf"\.{re.escape(name)}_(mean|var|std|p[0-9_e+-]+|preview\.png)\..+\.(part|tmp)")
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if pattern.fullmatch(f))


def check_options(samples: int | str | AutoSamples = 100, seed: int | None = None, stitch: str = "whole",
                  tile: int | None = None, percentiles: Sequence[float] = (),
                  precision: str = "float32", normalize: str = "volume") -> None:
    """Refuse option values that cannot work, before any file is opened."""
    resolve_samples(samples)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    if stitch not in STITCH_MODES:
        raise ConfigError(f"stitch must be one of {', '.join(STITCH_MODES)}, got {stitch!r}")
    if tile is not None and (tile < DOWNSCALE or tile % DOWNSCALE):
        raise ConfigError(f"tile (stripe height) must be a multiple of {DOWNSCALE} pixels, got {tile}")
    for q in percentiles:
        if not 0.0 <= q <= 100.0:
            raise ConfigError(f"percentiles must be in [0, 100], got {q}")
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")
    if normalize not in NORMALIZE_MODES:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {normalize!r}")


def preview_image(lr_up: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """BGR uint8 strip: upsampled LR | posterior mean | uncertainty heatmap, each labelled.

    Inputs are in normalised [0, 1] units; the variance is scaled to its 99.5th percentile so the
    structure shows even when the uncertainty is small.
    """
    gray = [cv2.cvtColor(_to_uint8(np.clip(a, 0.0, 1.0)), cv2.COLOR_GRAY2BGR) for a in (lr_up, mean)]
    top = float(np.percentile(var, 99.5)) or 1.0
    heat = cv2.applyColorMap(_to_uint8(np.clip(var / top, 0.0, 1.0)), cv2.COLORMAP_INFERNO)
    panels = gray + [heat]
    zoom = max(1, math.ceil(160 / panels[0].shape[1]))
    labels = ("LR (bicubic)", "posterior mean", "uncertainty (var)")
    columns = []
    for img, label in zip(panels, labels):
        img = cv2.resize(img, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST) if zoom > 1 else img
        bar = np.zeros((18, img.shape[1], 3), np.uint8)
        cv2.putText(bar, label, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        columns.append(np.vstack([bar, img]))
    gap = np.full((columns[0].shape[0], 2, 3), 255, np.uint8)
    return np.hstack([columns[0], gap, columns[1], gap, columns[2]])


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(unit, np.float32) * 255.0).astype(np.uint8)


def _png_bytes(path: str, image: np.ndarray) -> bytes:
    """``image`` encoded as the PNG file ``path`` will hold."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise InputError(path, "could not encode the preview image")
    return buf.tobytes()


def _check_roi(path: str, shape: Sequence[int], roi: Roi | None) -> tuple[tuple[int, int], ...]:
    """Resolve open ends and check each range lies inside the volume and is not empty."""
    if roi is None:
        return tuple((0, int(n)) for n in shape)
    if len(roi) != 3:
        raise InputError(path, f"ROI needs three index ranges (one per axis), got {len(roi)}")
    resolved = []
    for d, ((lo, hi), n) in enumerate(zip(roi, shape)):
        lo = 0 if lo is None else int(lo)
        hi = int(n) if hi is None else int(hi)
        if not 0 <= lo < hi <= n:
            raise InputError(path, f"ROI range {lo}:{hi} on axis {d} is empty or outside the volume's "
                                   f"0:{n} (shape {tuple(int(s) for s in shape)})")
        resolved.append((lo, hi))
    return tuple(resolved)


def _percentile_key(q: float) -> str:
    return f"p{q:g}".replace(".", "_")


def _fmt(values: Sequence[float], sep: str = " x ") -> str:
    return sep.join(f"{v:.4g}" for v in values)
