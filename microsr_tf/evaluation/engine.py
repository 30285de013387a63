"""The evaluation engine: slices of every method in, one row of metrics per method out.

Everything is read slice by slice through the volume interface (NIfTI files, numpy arrays, bicubic
upsampling computed on the fly), in one pass over the HR set and one pass per method, so memory holds a
few slices plus bounded samples (``Settings.max_samples`` pixels per method for distributions and
uncertainty) whatever the volume size.

Intensity scales, chosen so that each number measures what its name says:

* shape: each volume is segmented at its own Otsu threshold (or ``Settings.threshold`` in HR units);
* realism, sharpness, periodic artefacts: each volume normalised to [0, 1] by its own foreground
  statistics (:func:`microsr_tf.preprocessing.volume_stats`), so a global calibration error does not count;
* paired fidelity and uncertainty: everything on the aligned HR's scale (its statistics map it to [0, 1]);
* LR consistency: the LR slice on its volume's scale (foreground range -> [0, 1], not clipped, so air and
  soft tissue stay apart), the degraded output affinely mapped onto it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np

from ..errors import ConfigError, InputError
from ..preprocessing import IntensityStats, combine_stats, roi_bbox, volume_stats, volume_threshold
from .columns import COLUMNS, Column
from .consistency import lr_consistency
from .fidelity import paired_scores
from .periodic import periodic_scores
from .realism import (distribution_distance, edge_sharpness, glcm_distance, glcm_features, gradient_samples,
                      structure_region)
from .shape import HU_METHODS, DEFAULT_HU_METHOD, has_shape, hu_distance, hu_moments, min_hu_distances, segment
from .sources import ArrayVolume, BicubicVolume
from .uncertainty import Sparsification, calibration_curve, rmse_ratio, sparsification, spearman

Progress = Callable[[str], None]
BICUBIC = "bicubic"
TRUTH = "micro-CT truth"
HELD_OUT = "micro-CT held out"
RESERVED_NAMES = (BICUBIC, TRUTH, HELD_OUT)
DISPLAY_SIDE = 384  # montage panels are shrunk to at most this many pixels on a side
PLOT_SAMPLES = 20000  # gradient magnitudes kept per row for the realism plot


@dataclass
class Settings:
    """How the evaluation measures; the defaults are the documented ones."""

    axis: int = -1  # slice axis of every volume
    hu_method: str = DEFAULT_HU_METHOD  # OpenCV matchShapes distance: I1, I2 or I3
    threshold: float | None = None  # bone threshold in HR units; None: each volume's Otsu threshold
    lr_psf_fwhm: float = 0.0  # Gaussian PSF (FWHM in LR voxels) applied before area averaging; 0 = area only
    montage_slices: int = 3
    seed: int = 0  # of the pixel subsamples and the random sparsification ordering
    max_samples: int = 1 << 20  # pixels kept per method for distributions and uncertainty
    glcm_patches: int = 32  # GLCM patches per slice at most
    calibration_bins: int = 10
    roi_margin: int = 16  # uncertainty is measured inside the truth's bone bounding box plus this margin

    def validate(self) -> "Settings":
        if self.hu_method not in HU_METHODS:
            raise ConfigError(f"Hu distance must be one of {', '.join(HU_METHODS)}, got {self.hu_method!r}")
        if not -3 <= self.axis <= 2:
            raise ConfigError(f"axis must be 0, 1 or 2 (or -3..-1), got {self.axis}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"threshold must be a finite number, got {self.threshold}")
        if not (math.isfinite(self.lr_psf_fwhm) and 0.0 <= self.lr_psf_fwhm <= 10.0):
            raise ConfigError(f"LR PSF FWHM must be in [0, 10] LR voxels, got {self.lr_psf_fwhm}")
        for name in ("montage_slices", "glcm_patches", "calibration_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_samples < 1000:
            raise ConfigError(f"max_samples must be >= 1000, got {self.max_samples}")
        return self


@dataclass
class Candidate:
    """One row to evaluate: a mean volume (HR units) on the evaluation grid, optionally its variance."""

    name: str
    mean: Any  # anything with the Volume reading interface
    var: Any | None = None
    origin: str = ""  # where it came from, for the report
    reference: bool = False  # a yardstick (the truth itself), not a method: no paired metrics


@dataclass
class MontageSlice:
    """Display panels of one slice, intensities in [0, 1] (``std`` in HR units)."""

    index: int
    lr: np.ndarray
    output: np.ndarray
    hr: np.ndarray | None
    hr_label: str
    std: np.ndarray | None


@dataclass
class Row:
    """One method's (or reference's) numbers and the material for its plots."""

    name: str
    origin: str
    reference: bool
    values: dict[str, float]
    n_slices: int
    n_shapes: int  # slices whose segmentation held a shape (the ones m-HuM averages)
    notes: list[str] = field(default_factory=list)
    montage: list[MontageSlice] = field(default_factory=list)
    calibration: tuple[np.ndarray, np.ndarray] | None = None
    sparsification: Sparsification | None = None
    gradients: np.ndarray | None = None  # a subsample for the realism plot
    uncertainty_pixels: int = 0  # sampled pixels behind the uncertainty columns


@dataclass
class Evaluation:
    """What :func:`evaluate` measured; :func:`microsr_tf.evaluation.report.write_report` writes it."""

    rows: list[Row]
    columns: list[Column]
    settings: Settings
    paired: bool
    hr_set: dict[str, Any]  # summary of the reference HR set
    inputs: dict[str, Any] = field(default_factory=dict)  # descriptions of the inputs for the report

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def table(self) -> list[dict[str, Any]]:
        """One dict per row: ``method``, ``kind`` and every present column (NaN where not applicable)."""
        return [{"method": r.name, "kind": "reference" if r.reference else "method",
                 **{c.key: r.values.get(c.key, float("nan")) for c in self.columns}} for r in self.rows]


# -------------------------------------------------------------------------------------------- helpers


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference and math.isfinite(reference) and math.isfinite(value) else float("nan")


def _volume_scale(vol: Any, axis: int, threshold: float | None) -> tuple[float, IntensityStats, str | None]:
    """A volume's bone threshold and its foreground statistics; a flat volume gets a neutral scale
    (everything maps to 0.5) and a note instead of an error, so a collapsed output is scored, not refused."""
    thr = float(threshold) if threshold is not None else volume_threshold(vol, axis)
    try:
        return thr, volume_stats(vol, axis=axis, threshold=thr), None
    except InputError as exc:
        return thr, IntensityStats(thr, 1.0, -0.5, 0.5), f"no intensity spread to normalise ({exc.problem})"


def _linear(stats: IntensityStats, x: np.ndarray) -> np.ndarray:
    """``stats.normalize`` without the clip: the LR slice keeps what it shows below and above the robust
    foreground range (air against soft tissue), which LR consistency must not throw away."""
    z = (np.asarray(x, np.float64) - stats.mean) / stats.std
    return (z - stats.low) / (stats.high - stats.low)


def _display(image: np.ndarray) -> np.ndarray:
    """Shrink for the montage (area averaging) so a 1828^2 slice does not make a 100 MB PNG."""
    image = np.asarray(image, np.float32)
    side = max(image.shape)
    if side <= DISPLAY_SIDE:
        return image
    scale = DISPLAY_SIDE / side
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _montage_indices(n: int, count: int) -> list[int]:
    if n <= count:
        return list(range(n))
    return sorted({int(round((i + 1) * n / (count + 1))) for i in range(count)})


class _LocalStats:
    """Shape and local statistics of one volume, gathered slice by slice with bounded samples."""

    def __init__(self, rng: np.random.Generator, grad_limit: int, glcm_patches: int):
        self.rng, self.grad_limit, self.glcm_patches = rng, grad_limit, glcm_patches
        self.hu: list[np.ndarray] = []
        self.hu_slices: list[int] = []
        self.grads: list[np.ndarray] = []
        self.glcm: list[np.ndarray] = []
        self.periodic: list[dict[str, float]] = []

    def add(self, k: int, x: np.ndarray, threshold: float, stats: IntensityStats) -> tuple[np.ndarray, np.ndarray | None]:
        """Measure slice ``k``; return its mask and Hu invariants (None when it holds no shape)."""
        mask = segment(x, threshold)
        hu = hu_moments(mask) if has_shape(mask) else None
        if hu is not None:
            self.hu.append(hu)
            self.hu_slices.append(k)
        u = stats.normalize(x)
        region = structure_region(mask)
        self.grads.append(gradient_samples(u, region, self.rng, self.grad_limit))
        self.glcm.append(glcm_features(u, region, self.rng, self.glcm_patches))
        self.periodic.append(periodic_scores(u))
        return mask, hu

    def hu_array(self) -> np.ndarray:
        return np.asarray(self.hu, np.float64).reshape(-1, 7)

    def grad_array(self) -> np.ndarray:
        return np.concatenate(self.grads) if self.grads else np.zeros(0, np.float32)

    def glcm_array(self) -> np.ndarray:
        return np.concatenate(self.glcm) if self.glcm else np.zeros((0, 4))

    def periodic_mean(self, key: str) -> float:
        return _nanmean([p[key] for p in self.periodic])


@dataclass
class _HRSet:
    volumes: list[Any]
    stats: list[_LocalStats]
    hu: np.ndarray  # all shapes, [m, 7]
    hu_origin: list[tuple[int, int]]  # (volume, slice) of each row of hu
    grads: np.ndarray
    glcm: np.ndarray
    sharpness: float
    periodic: dict[str, float]
    display: IntensityStats  # pooled statistics: the montage scale when there is no paired truth


def _scan_hr_set(hr_set: Sequence[Any], settings: Settings, label: str, say: Progress) -> _HRSet:
    ax = settings.axis
    total = sum(v.n_slices(ax) for v in hr_set)
    limit = max(1, settings.max_samples // max(1, total))
    per_volume, scales = [], []
    for i, vol in enumerate(hr_set):
        say(f"HR set {i + 1}/{len(hr_set)}: {vol.path} ({vol.n_slices(ax)} slices)")
        thr, stats, _ = _volume_scale(vol, ax, settings.threshold)
        scales.append(stats)
        acc = _LocalStats(np.random.default_rng([settings.seed, 1, i]), limit, settings.glcm_patches)
        for k, x in vol.iter_slices(ax):
            acc.add(k, x.astype(np.float64), thr, stats)
        per_volume.append(acc)
    hu = np.concatenate([a.hu_array() for a in per_volume])
    if len(hu) == 0:
        raise InputError(label, "no slice of the HR set holds a segmented structure (check --threshold)")
    origin = [(i, k) for i, a in enumerate(per_volume) for k in a.hu_slices]
    grads = np.concatenate([a.grad_array() for a in per_volume])
    periodic = {key: _nanmean([p[key] for a in per_volume for p in a.periodic]) for key in ("2px", "4px")}
    return _HRSet(volumes=list(hr_set), stats=per_volume, hu=hu, hu_origin=origin, grads=grads,
                  glcm=np.concatenate([a.glcm_array() for a in per_volume]), sharpness=edge_sharpness(grads),
                  periodic=periodic, display=combine_stats(scales))


def _unpaired_values(acc: _LocalStats, ref_hu: np.ndarray, ref_grads: np.ndarray, ref_glcm: np.ndarray,
                     ref_sharpness: float, ref_periodic: Mapping[str, float], method: str) -> dict[str, float]:
    """m-HuM, realism, sharpness and periodic scores of one volume against a reference set."""
    hu = acc.hu_array()
    grads = acc.grad_array()
    return {
        "mhum": float(min_hu_distances(hu, ref_hu, method)[0].mean()) if len(hu) else float("nan"),
        "grad_w1": distribution_distance(grads, ref_grads),
        "glcm_w1": glcm_distance(acc.glcm_array(), ref_glcm),
        "sharpness": _ratio(edge_sharpness(grads), ref_sharpness),
        "periodic_2px": _ratio(acc.periodic_mean("2px"), ref_periodic["2px"]),
        "periodic_4px": _ratio(acc.periodic_mean("4px"), ref_periodic["4px"]),
    }


def _held_out_row(hr: _HRSet, settings: Settings) -> Row | None:
    """Each HR volume scored against the others, averaged: how far real micro-CT is from real micro-CT."""
    if len(hr.stats) < 2:
        return None
    rows = []
    for i, acc in enumerate(hr.stats):
        others = [a for j, a in enumerate(hr.stats) if j != i]
        ref_hu = np.concatenate([a.hu_array() for a in others])
        ref_grads = np.concatenate([a.grad_array() for a in others])
        if len(ref_hu) == 0 or len(acc.hu) == 0:
            continue
        rows.append(_unpaired_values(
            acc, ref_hu, ref_grads, np.concatenate([a.glcm_array() for a in others]), edge_sharpness(ref_grads),
            {key: _nanmean([p[key] for a in others for p in a.periodic]) for key in ("2px", "4px")},
            settings.hu_method))
    if not rows:
        return None
    values = {key: _nanmean([r[key] for r in rows]) for key in rows[0]}
    return Row(name=HELD_OUT, origin=f"each of the {len(hr.stats)} HR-set volumes against the others, averaged",
               reference=True, values=values, n_slices=sum(len(a.periodic) for a in hr.stats),
               n_shapes=len(hr.hu), gradients=_subsample(hr.grads, settings.seed))


def _subsample(values: np.ndarray, seed: int, size: int = PLOT_SAMPLES) -> np.ndarray:
    values = np.ravel(values)
    if values.size <= size:
        return values
    return np.random.default_rng([seed, 7]).choice(values, size=size, replace=False)


# --------------------------------------------------------------------------------------------- engine


def evaluate(lr: Any, factors: Sequence[float], hr_set: Sequence[Any], candidates: Sequence[Candidate],
             paired_hr: Any | None = None, settings: Settings | None = None, progress: Progress | None = None,
             hr_label: str = "HR set", inputs: Mapping[str, Any] | None = None) -> Evaluation:
    """Score every candidate; return the rows (candidates in order, then the held-out HR reference).

    ``lr`` is the LR scan (or the box of it that was upsampled) on its own grid; every candidate, and
    ``paired_hr`` when given, lies on that box's upsampled grid (``factors`` = LR / HR in-plane spacing),
    slice ``k`` of each matching slice ``k`` of ``lr``. ``hr_set`` holds the real HR volumes (any grid
    with the candidates' pixel size). All of them need the volume reading interface (see
    :mod:`microsr_tf.evaluation.sources`).
    """
    settings = dataclasses.replace(settings or Settings()).validate()
    ax = settings.axis
    say = progress or (lambda message: None)
    if not hr_set:
        raise InputError(hr_label, "the HR set is empty")
    n = lr.n_slices(ax)
    for c in candidates:
        for vol in (c.mean, c.var):
            if vol is not None and vol.n_slices(ax) != n:
                raise InputError(vol.path, f"has {vol.n_slices(ax)} slices along axis {ax % 3}, the LR box {n}")
    hr = _scan_hr_set(hr_set, settings, hr_label, say)

    truth_thr = truth_stats = None
    if paired_hr is not None:
        truth_thr, truth_stats, note = _volume_scale(paired_hr, ax, settings.threshold)
        if note:
            raise InputError(paired_hr.path, note)
    _, lr_stats, note = _volume_scale(lr, ax, None)
    if note:
        raise InputError(lr.path, note)
    display = truth_stats if truth_stats is not None else hr.display
    montage_ks = set(_montage_indices(n, settings.montage_slices))
    limit = max(1, settings.max_samples // max(1, n))

    rows = []
    for cand in candidates:
        rows.append(_evaluate_candidate(cand, lr, factors, hr, paired_hr, truth_thr, truth_stats, lr_stats,
                                        display, montage_ks, limit, settings, say))
    held_out = _held_out_row(hr, settings)
    if held_out is not None:
        rows.append(held_out)

    groups = {"shape", "unpaired"}
    if paired_hr is not None:
        groups.add("paired")
        if any(c.var is not None and not c.reference for c in candidates):
            groups.add("uncertainty")
    hr_summary = {
        "volumes": [str(v.path) for v in hr_set], "slices": int(sum(len(a.periodic) for a in hr.stats)),
        "slices_with_shape": int(len(hr.hu)), "sharpness_p99": hr.sharpness,
        "periodic_2px": hr.periodic["2px"], "periodic_4px": hr.periodic["4px"],
        "gradients": _subsample(hr.grads, settings.seed),
    }
    return Evaluation(rows=rows, columns=[c for c in COLUMNS if c.group in groups], settings=settings,
                      paired=paired_hr is not None, hr_set=hr_summary, inputs=dict(inputs or {}))


def _evaluate_candidate(cand: Candidate, lr: Any, factors: Sequence[float], hr: _HRSet,
                        paired_hr: Any | None, truth_thr: float | None, truth_stats: IntensityStats | None,
                        lr_stats: IntensityStats, display: IntensityStats, montage_ks: set[int], limit: int,
                        settings: Settings, say: Progress) -> Row:
    ax = settings.axis
    n = lr.n_slices(ax)
    rng = np.random.default_rng([settings.seed, 2])  # the same stream for every row: common random numbers
    thr, stats, note = _volume_scale(cand.mean, ax, settings.threshold)
    notes = [note] if note else []
    acc = _LocalStats(rng, limit, settings.glcm_patches)
    paired = paired_hr is not None and not cand.reference
    per_slice: dict[str, list[float]] = {}
    std_samples, err_samples = [], []
    montage = []
    hu_of_slice: dict[int, np.ndarray] = {}
    none = itertools.repeat((None, None))
    var_it = cand.var.iter_slices(ax) if cand.var is not None else none
    truth_it = paired_hr.iter_slices(ax) if paired else none
    report_every = max(1, n // 5)
    for done, ((k, x), (_, v), (_, lr_slice), (_, t)) in enumerate(
            zip(cand.mean.iter_slices(ax), var_it, lr.iter_slices(ax), truth_it), start=1):
        x = x.astype(np.float64)
        mask, hu = acc.add(k, x, thr, stats)
        if hu is not None:
            hu_of_slice[k] = hu
        lr_u = _linear(lr_stats, lr_slice)
        for key, value in lr_consistency(x, lr_u, factors, settings.lr_psf_fwhm).items():
            per_slice.setdefault(key, []).append(value)
        std = None
        if v is not None:
            v = v.astype(np.float64)
            if v.min(initial=0.0) < -1e-6 * max(1.0, float(np.abs(v).max(initial=0.0))):  # rounding aside
                raise InputError(cand.var.path, f"slice {k} holds negative values (down to {v.min():.4g}); "
                                                "a variance cannot be negative: is it the file predict wrote?")
            std = np.sqrt(np.maximum(v, 0.0))
        if paired:
            t = t.astype(np.float64)
            t_u, x_u = truth_stats.normalize(t), truth_stats.normalize(x)
            for key, value in paired_scores(x_u, t_u, 1.0, calibration_source=x).items():
                per_slice.setdefault(key, []).append(value)
            t_mask = segment(t, truth_thr)
            if hu is not None and has_shape(t_mask):
                per_slice.setdefault("hum_paired", []).append(
                    float(hu_distance(hu, hu_moments(t_mask), settings.hu_method)))
            if std is not None:
                box = roi_bbox(t_mask.astype(np.float32), 0.5, settings.roi_margin) or (slice(None), slice(None))
                s = (std[box] / truth_stats.scale).ravel()
                e = (x_u[box].astype(np.float64) - t_u[box]).ravel()
                if s.size > limit:
                    pick = rng.choice(s.size, size=limit, replace=False)
                    s, e = s[pick], e[pick]
                std_samples.append(s)
                err_samples.append(e)
        if k in montage_ks and not cand.reference:
            montage.append(MontageSlice(
                index=k, lr=_display(lr_stats.normalize(lr_slice)), output=_display(display.normalize(x)),
                hr=_display(display.normalize(t)) if paired else None,
                hr_label="aligned HR" if paired else "", std=_display(std) if std is not None else None))
        if done % report_every == 0 or done == n:
            say(f"{cand.name}: {done}/{n} slices")

    values = _unpaired_values(acc, hr.hu, hr.grads, hr.glcm, hr.sharpness, hr.periodic, settings.hu_method)
    values.update({key: _nanmean(vals) for key, vals in per_slice.items()})
    row = Row(name=cand.name, origin=cand.origin, reference=cand.reference, values=values, n_slices=n,
              n_shapes=len(acc.hu), notes=notes, montage=montage, gradients=_subsample(acc.grad_array(), settings.seed))
    if n and len(acc.hu) < n:
        row.notes.append(f"{n - len(acc.hu)} of {n} slices hold no segmented structure; m-HuM averages the others")
    if not paired:
        _match_montage_to_hr_set(row, hu_of_slice, hr, display, settings)
    if std_samples:
        _uncertainty(row, np.concatenate(std_samples), np.concatenate(err_samples), settings)
    return row


def _match_montage_to_hr_set(row: Row, hu_of_slice: Mapping[int, np.ndarray], hr: _HRSet, display: IntensityStats,
                             settings: Settings) -> None:
    """Without a paired truth, show next to each montage slice the HR-set slice closest in shape."""
    for panel in row.montage:
        hu = hu_of_slice.get(panel.index)
        if hu is None:
            continue
        _, best = min_hu_distances(hu[None, :], hr.hu, settings.hu_method)
        vi, k = hr.hu_origin[int(best[0])]
        vol = hr.volumes[vi]
        panel.hr = _display(display.normalize(vol.read_slice(k, settings.axis)))
        panel.hr_label = f"HR set, closest shape:\n{getattr(vol.path, 'name', vol.path)}, slice {k}"


def _uncertainty(row: Row, std: np.ndarray, err: np.ndarray, settings: Settings) -> None:
    row.uncertainty_pixels = int(std.size)
    if not np.any(std > 0):
        row.notes.append("the variance is zero everywhere (a deterministic method): no uncertainty to assess")
        return
    sp = sparsification(std, err, seed=settings.seed)
    row.sparsification = sp
    row.calibration = calibration_curve(std, np.abs(err), settings.calibration_bins)
    row.values.update({"unc_spearman": spearman(std, np.abs(err)), "unc_ause": sp.ause,
                       "unc_ause_random": sp.ause_random, "unc_ratio": rmse_ratio(std, err)})


# ------------------------------------------------------------------------------------------ array API


def evaluate_arrays(lr: np.ndarray, hr_set: Sequence[np.ndarray], predictions: Mapping[str, Any],
                    paired_hr: np.ndarray | None = None, factors: Sequence[float] | None = None,
                    hr_stats: IntensityStats | None = None, settings: Settings | None = None,
                    progress: Progress | None = None) -> Evaluation:
    """:func:`evaluate` on in-memory volumes (3-D arrays sliced along ``settings.axis``).

    ``predictions`` maps a method name to its mean volume or a ``(mean, var)`` pair, on the LR's
    upsampled grid (``factors`` = LR / HR in-plane spacing; default: the first prediction's in-plane
    shape over the LR's). Bicubic upsampling of ``lr`` is added as the first row, mapped to HR units as
    ``predict`` maps the network's output (``hr_stats``; default: the pooled statistics of ``hr_set``,
    what training computes from its HR folder), and ``paired_hr``, when given, as a reference row.
    """
    settings = dataclasses.replace(settings or Settings()).validate()
    ax = settings.axis
    lr_vol = ArrayVolume(lr, path="<LR array>")
    hr_vols = [ArrayVolume(a, path=f"<HR array {i}>") for i, a in enumerate(hr_set)]
    if not predictions:
        raise ConfigError("no predictions to evaluate")
    cands = []
    for name, value in predictions.items():
        check_name(name)
        mean, var = value if isinstance(value, tuple) else (value, None)
        cands.append(Candidate(name, ArrayVolume(mean, path=f"<{name} mean>"),
                               None if var is None else ArrayVolume(var, path=f"<{name} var>"), origin="array"))
    if factors is None:
        a, b = (d for d in range(3) if d != ax % 3)
        shape = cands[0].mean.shape
        factors = (shape[a] / lr_vol.shape[a], shape[b] / lr_vol.shape[b])
    if hr_stats is None:
        hr_stats = combine_stats([volume_stats(v, axis=ax) for v in hr_vols])
    bicubic = BicubicVolume(lr_vol, factors, volume_stats(lr_vol, axis=ax, factors=factors), hr_stats, axis=ax)
    for c in cands:
        for vol in (c.mean, c.var):
            if vol is not None and vol.shape != bicubic.shape:
                raise InputError(vol.path, f"shape {vol.shape} is not the LR's upsampled grid {bicubic.shape}")
    truth = None
    if paired_hr is not None:
        truth = ArrayVolume(paired_hr, path="<paired HR array>")
        if truth.shape != bicubic.shape:
            raise InputError(truth.path, f"shape {truth.shape} is not the LR's upsampled grid {bicubic.shape}")
    rows = [Candidate(BICUBIC, bicubic, origin="bicubic upsampling of the LR array")] + cands
    if truth is not None:
        rows.append(Candidate(TRUTH, truth, origin="the paired HR array", reference=True))
    return evaluate(lr_vol, factors, hr_vols, rows, paired_hr=truth, settings=settings, progress=progress,
                    inputs={"lr": "array", "hr_set": f"{len(hr_vols)} arrays", "factors": list(map(float, factors)),
                            "bicubic_hr_stats": hr_stats.to_dict()})


def check_name(name: str) -> None:
    """Method names end up in file names and table rows: short, plain, not a reserved row name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", name or ""):
        raise ConfigError(f"method name {name!r} must start with a letter or digit and use only letters, digits "
                          "and . _ + - (at most 64 characters)")
    if name.lower() in (r.lower() for r in RESERVED_NAMES):
        raise ConfigError(f"method name {name!r} is reserved for a row the evaluation adds itself")
