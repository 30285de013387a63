"""Whole-volume prediction: an LR NIfTI in, posterior mean and variance NIfTI volumes out (paper eq. 4).

Each slice is read, resampled in-plane to the model's HR spacing and normalised with the volume's
statistics (as in training), predicted with Monte Carlo dropout plus stitching, mapped back to HR
units and written at once, so peak memory does not grow with the number of slices.
"""

from __future__ import annotations

import math
import os
import re
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np

from ..errors import ConfigError, InputError
from ..preprocessing import IntensityStats, check_coarser, resample_slice, volume_stats
from ..volumes import (Volume, VolumeWriter, make_output_dir, nifti_stem, open_volume, resampled_affine,
                       resampled_shape)
from ..models.generator import PRECISIONS
from .mc import MCResult, MonteCarloPredictor
from .stitching import MODES as STITCH_MODES
from .stitching import predict_slice

MAX_SEED = 2**31 - 1  # dropout seed rows are int32
FACTOR_TOLERANCE = 0.05  # relative mismatch allowed between the input's and the model's scale factors

META_KEYS = ("hr_spacing", "factors", "hr_stats")  # what prediction reads from the model's metadata

Roi = Sequence[tuple[int | None, int | None]]
Progress = Callable[[int, int, float], None]
SliceEngine = Callable[[np.ndarray, int], MCResult]  # (normalised HR-grid slice, slice seed) -> posterior


@dataclass(frozen=True)
class VolumePlan:
    """What will be predicted for one input: the opened volume, validated ROI and the output grid."""

    input_path: str
    name: str
    volume: Volume
    axis: int  # non-negative slice axis
    roi: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # half-open voxel ranges of the input
    factors: tuple[float, float]
    out_shape: tuple[int, int, int]
    out_affine: np.ndarray

    @property
    def slices(self) -> range:
        """Input slice indices to process, along ``axis``."""
        return range(*self.roi[self.axis])


@dataclass
class PredictResult:
    """Files written for one volume, how long it took, and how settled the Monte Carlo estimate is."""

    input_path: str
    outputs: dict[str, str]  # "mean", "var", optionally "std", "p5", ..., "preview" -> path
    shape: tuple[int, int, int]
    n_slices: int
    samples: int
    seed: int  # base seed actually used; rerun with it to reproduce the files
    seconds: float
    slices_per_s: float
    convergence: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: where the output went, speed and convergence."""
        conv = ", ".join(f"{k} {v:.3g}" for k, v in self.convergence.items())
        return (f"{os.path.basename(self.input_path)}: {self.n_slices} slices -> {self.shape} in "
                f"{self.seconds:.1f} s ({self.slices_per_s:.2f} slices/s), T={self.samples}, seed {self.seed}"
                + (f"; change from T/2 to T (worst slice): {conv}" if conv else ""))


def output_paths(name: str, out_dir: str | os.PathLike, write_std: bool = False,
                 percentiles: Sequence[float] = (), preview: bool = False) -> dict[str, str]:
    """Final output paths for a volume ``name``, keyed by what they hold."""
    out_dir = os.fspath(out_dir)
    keys = ["mean", "var"] + (["std"] if write_std else []) + [_percentile_key(q) for q in percentiles]
    paths = {key: os.path.join(out_dir, f"{name}_{key}.nii.gz") for key in keys}
    if preview:
        paths["preview"] = os.path.join(out_dir, f"{name}_preview.png")
    return paths


def slice_seed(seed: int, index: int) -> int:
    """A 31-bit seed for slice ``index`` that depends only on the base seed and the slice index."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0] >> 1)


def plan_volume(input_path: str | os.PathLike, meta: Mapping[str, Any], roi: Roi | None = None,
                axis: int | None = None) -> VolumePlan:
    """Open and check one input against the model's metadata; nothing is read or written yet.

    Raises InputError naming the file for an unreadable volume, a bad axis or ROI, an input that is
    not coarser than the model's HR spacing, or an input whose scale differs from the model's.
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
    factors = tuple(float(f) for f in check_coarser(input_path, lr_spacing, hr_spacing))
    trained = tuple(float(f) for f in meta["factors"])
    if any(abs(f - t) > FACTOR_TOLERANCE * t for f, t in zip(factors, trained)):
        raise InputError(
            input_path,
            f"in-plane spacing {_fmt(lr_spacing)} mm needs upsampling factors {_fmt(factors)} to the model's "
            f"{_fmt(hr_spacing)} mm, but the model was trained for factors {_fmt(trained)}")

    roi_shape = tuple(hi - lo for lo, hi in roi)
    origin = np.asarray(vol.affine, dtype=np.float64).copy()
    origin[:3, 3] = origin[:3, :3] @ np.array([lo for lo, _ in roi], dtype=np.float64) + origin[:3, 3]
    return VolumePlan(
        input_path=input_path, name=nifti_stem(input_path), volume=vol, axis=axis, roi=roi,
        factors=factors, out_shape=tuple(int(n) for n in resampled_shape(roi_shape, axis, factors)),
        out_affine=np.asarray(resampled_affine(origin, axis, factors)))


def predict_volume(
    input_path: str | os.PathLike,
    generator: Any,
    meta: Mapping[str, Any],
    out_dir: str | os.PathLike,
    samples: int = 100,
    seed: int | None = None,
    stitch: str = "blend",
    tile: int = 256,
    overlap: float = 0.25,
    batch_size: int = 8,
    roi: Roi | None = None,
    axis: int | None = None,
    write_std: bool = False,
    percentiles: Sequence[float] = (),
    preview: bool = False,
    progress: Progress | None = None,
    precision: str = "float32",
    normalize: str = "volume",
    engine: SliceEngine | None = None,
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
    ``precision="bfloat16"`` runs the generator's convolutions in bfloat16 (faster on CPUs with AMX).
    ``normalize`` chooses the LR intensity statistics (see :func:`input_stats`). ``engine`` replaces the
    local Monte Carlo posterior of one normalised HR-grid slice (``engine(slice, slice_seed) -> MCResult``,
    e.g. a TF-Serving client); everything else -- reading, resampling, normalising, seeds, units,
    writing -- stays the same, so the files equal a local run's when the engine computes the same.
    """
    check_options(samples=samples, seed=seed, stitch=stitch, tile=tile, overlap=overlap, batch_size=batch_size,
                  percentiles=percentiles, precision=precision, normalize=normalize)
    plan = plan_volume(input_path, meta, roi=roi, axis=axis)
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint32)[0] >> 1)
    paths = output_paths(plan.name, out_dir, write_std, percentiles, preview)
    make_output_dir(out_dir)

    start = time.perf_counter()
    vol, ax, ks = plan.volume, plan.axis, plan.slices
    lr_stats = input_stats(vol, ax, plan.factors, meta, normalize)
    hr_stats = IntensityStats.from_dict(meta["hr_stats"])
    (i0, i1), (j0, j1) = [r for d, r in enumerate(plan.roi) if d != ax]
    if engine is None:
        predictor = MonteCarloPredictor(generator, samples=samples, percentiles=tuple(percentiles),
                                        precision=precision)

        def engine(image: np.ndarray, slice_seed_: int) -> MCResult:
            predictor.seed = slice_seed_
            return predict_slice(predictor, image, mode=stitch, tile=tile, overlap=overlap, batch_size=batch_size)
    middle = ks[len(ks) // 2]
    panel = None
    convergence: dict[str, float] = {}
    with ExitStack() as stack:
        writers = {key: stack.enter_context(VolumeWriter(path, plan.out_shape, plan.out_affine, axis=ax,
                                                         header=vol.header))
                   for key, path in paths.items() if key != "preview"}
        for done, (k, raw) in enumerate(vol.iter_slices(ax, ks), start=1):
            lr_up = lr_stats.normalize(resample_slice(raw[i0:i1, j0:j1], plan.factors))
            res = engine(lr_up, slice_seed(seed, k))
            for key, arr in _to_hr_units(res, hr_stats, write_std).items():
                writers[key].write_slice(k - ks.start, arr)
            for key, value in res.convergence.items():
                convergence[key] = max(value, convergence.get(key, value))
            if preview and k == middle:
                panel = preview_image(lr_up, res.mean, res.var)
            if progress is not None:
                progress(done, len(ks), time.perf_counter() - start)
    if panel is not None:
        _write_png_atomic(paths["preview"], panel)
    seconds = time.perf_counter() - start
    return PredictResult(
        input_path=plan.input_path, outputs=paths, shape=plan.out_shape, n_slices=len(ks), samples=samples,
        seed=seed, seconds=seconds, slices_per_s=len(ks) / seconds if seconds > 0 else math.inf,
        convergence=convergence)


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
            raise ConfigError("this model stores no LR statistics (trained before they were recorded); "
                              "use normalize='volume'")
        return IntensityStats.from_dict(meta["lr_stats"])
    if normalize != "volume":
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {normalize!r}")
    return volume_stats(vol, axis=axis, threshold=meta.get("roi_threshold_lr"), factors=factors)


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


def check_options(samples: int = 100, seed: int | None = None, stitch: str = "blend", tile: int = 256,
                  overlap: float = 0.25, batch_size: int = 8, percentiles: Sequence[float] = (),
                  precision: str = "float32", normalize: str = "volume") -> None:
    """Refuse option values that cannot work, before any file is opened."""
    if samples < 2:
        raise ConfigError(f"samples must be >= 2 to estimate a variance, got {samples}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    if stitch not in STITCH_MODES:
        raise ConfigError(f"stitch must be one of {', '.join(STITCH_MODES)}, got {stitch!r}")
    if tile < 8 or tile % 4:
        raise ConfigError(f"tile must be a multiple of 4 and >= 8 pixels, got {tile}")
    if not 0.0 <= overlap <= 0.75:  # beyond 0.75 every pixel is computed more than 16 times over
        raise ConfigError(f"overlap must be in [0, 0.75], got {overlap}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    for q in percentiles:
        if not 0.0 <= q <= 100.0:
            raise ConfigError(f"percentiles must be in [0, 100], got {q}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
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


def _write_png_atomic(path: str, image: np.ndarray) -> None:
    """Encode to PNG and rename into place, so a killed run leaves no partial image.

    The temporary name is opened with ``"xb"`` (not mkstemp) so the file gets the usual umask
    permissions rather than owner-only ones.
    """
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise InputError(path, "could not encode the preview image")
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(buf.tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.4g}" for v in values)
