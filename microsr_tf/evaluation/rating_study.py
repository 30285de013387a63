"""A blinded rating study as one static HTML page (paper Fig. 3), and the key that unblinds it.

Each trial shows one slice of the clinical input, bicubic-upsampled onto the prediction grid (left),
next to one method's posterior mean of the same slice (right). Raters score two criteria on a
six-star scale, as in the paper: (a) resolution and noise, (b) shape and structure. Trials are the
``slices x methods`` pairs in a seeded random order; the page holds only trial ids and images, and
``key.json`` beside it maps every trial to its method and slice.

Display window (the same rule for every method): each volume (the upsampled input and each method's
mean) is mapped linearly to 8-bit grey between the 0.5th and 99.5th percentiles of its own voxels over
the slices of the study. One rule for all methods, so no method gets a hand-tuned window, and a
method's intensity calibration (its grey scale) does not show, only what it draws.

The page is self-contained (inline CSS/JS, images as ``data:`` URIs, a Content-Security-Policy that
forbids any network access), so it works when opened from ``file://`` on a rater's machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from ..errors import ConfigError, InputError
from ..files import atomic_write_text
from ..preprocessing import resample_slice, upsample_factors
from ..volumes import Volume, in_plane_axes, make_output_dir, nifti_stem, open_volume, resampled_shape

# (CSV column, label on the page, the paper's question) per criterion, in the page's order.
CRITERIA = (
    ("resolution_noise", "Resolution and noise", "Good resolution and a low noise level"),
    ("shape_structure", "Shape and structure", "Good shape and structural information"),
)
SCALE = (1, 6)  # six stars: 1 = poor, 6 = excellent
CSV_COLUMNS = ("study_id", "rater", "trial") + tuple(c for c, _, _ in CRITERIA) + ("rated_at",)
WINDOW_PERCENTILES = (0.5, 99.5)
PAGE_NAME = "study.html"
KEY_NAME = "key.json"
KEY_FORMAT = "microsr-tf rating-study key 1"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]{0,39}")
_TOL = 1e-3  # in LR voxels: how far a prediction's grid may be from an exact refinement (float32 affines)


@dataclass(frozen=True)
class Method:
    """One ``NAME=DIR`` of the command line and the posterior-mean file it points to."""

    name: str
    mean_path: Path


@dataclass(frozen=True)
class Placement:
    """Where a prediction grid lies on the LR grid: slice axis, in-plane refinement and ROI origin."""

    axis: int
    factors: tuple[float, float]
    origin: tuple[int, int, int]  # LR voxel index of the prediction's first voxel (its ROI start)
    lr_extent: tuple[int, int, int]  # LR voxels covered along each axis


@dataclass(frozen=True)
class StudyResult:
    """What ``make_study`` wrote: the page for raters, the key, and the trials' slices."""

    study_id: str
    page: Path
    key: Path
    n_trials: int
    slices: tuple[int, ...]
    page_bytes: int


def parse_method_names(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=DIR`` strings -> ``(name, dir)`` pairs, checking their syntax alone (ConfigError): a malformed
    or repeated NAME, or no spec at all."""
    if not specs:
        raise ConfigError("--method: give at least one NAME=DIR (a folder written by `microsr-tf predict`)")
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, directory = spec.partition("=")
        name = name.strip()
        if not sep or not directory.strip():
            raise ConfigError(f"--method {spec!r}: expected NAME=DIR, e.g. cyclegan=out/cyclegan")
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"--method {spec!r}: NAME must be 1-40 letters, digits, spaces or _.+- "
                              "and start with a letter or digit")
        if any(other == name for other, _ in pairs):
            raise ConfigError(f"--method {spec!r}: method name {name!r} is given twice")
        pairs.append((name, directory))
    return pairs


def parse_methods(specs: Sequence[str], lr_path: str | os.PathLike) -> list[Method]:
    """``NAME=DIR`` strings -> methods whose ``DIR/<LR stem>_mean.nii.gz`` exists.

    ConfigError for a malformed or repeated NAME or one prediction given under two names; InputError
    naming the folder or file when a folder is missing or holds no prediction for the LR scan.
    """
    stem = nifti_stem(lr_path)
    methods: list[Method] = []
    for spec, (name, directory) in zip(specs, parse_method_names(specs)):
        folder = Path(directory)
        if not folder.exists():
            raise InputError(folder, f"folder of method {name!r} not found")
        if not folder.is_dir():
            raise InputError(folder, f"method {name!r} must name a folder of `microsr-tf predict` outputs")
        mean = folder / f"{stem}_mean.nii.gz"
        if not mean.is_file():
            raise InputError(mean, f"not found: method {name!r} has no posterior mean for {Path(lr_path).name} "
                                   f"(run `microsr-tf predict {lr_path} --out-dir {folder}`)")
        twin = next((m for m in methods if os.path.samefile(m.mean_path, mean)), None)
        if twin is not None:  # raters would score one image under two labels
            raise ConfigError(f"--method {spec!r}: {mean} is method {twin.name!r}'s prediction too; give each "
                              "method its own predictions")
        methods.append(Method(name, mean))
    return methods


def _affine_mm(vol: Volume) -> np.ndarray:
    """The volume's affine with world coordinates in mm, whatever the header's spatial unit."""
    out = np.asarray(vol.affine, dtype=np.float64).copy()
    out[:3] *= vol.spacing[0] / float(vol.header.get_zooms()[0])  # mm per header unit
    return out


def place_on_lr(lr: Volume, pred: Volume) -> Placement:
    """How ``pred``'s voxel grid refines ``lr``'s (as ``microsr-tf predict`` writes it, ``--roi`` included).

    A prediction voxel ``j`` along an in-plane axis sits at LR index ``origin + (j + 0.5) / f - 0.5``
    and along the slice axis at ``origin + j`` (:func:`microsr_tf.volumes.resampled_affine`). The
    slice axis is the one with the LR's spacing (the last such axis if several). InputError naming
    the prediction when its grid is rotated, flipped, not finer than the LR, offset by a fraction
    of a voxel, or reaches outside the LR volume.
    """
    m = np.linalg.solve(_affine_mm(lr), _affine_mm(pred))
    lin, shift = m[:3, :3], m[:3, 3]
    diag = np.diag(lin)
    if np.abs(lin - np.diag(diag)).max() > _TOL or (diag <= 0).any():
        raise InputError(pred.path, f"its voxel grid is rotated, sheared or flipped relative to {lr.path}; "
                                    "not a prediction of that scan")
    same = [ax for ax in range(3) if abs(diag[ax] - 1.0) <= _TOL]
    if not same:
        raise InputError(pred.path, f"no axis keeps the slice spacing of {lr.path} (LR spacing "
                                    f"{_fmt(lr.spacing)} mm, prediction {_fmt(pred.spacing)} mm)")
    axis = same[-1]
    a, b = in_plane_axes(axis)
    try:
        factors = upsample_factors((1.0, 1.0), (diag[a], diag[b]), path=pred.path)
    except InputError:
        raise InputError(pred.path, f"its grid ({_fmt(pred.spacing)} mm) is not finer in-plane than "
                                    f"{lr.path} ({_fmt(lr.spacing)} mm)") from None
    factor = {axis: 1.0, a: factors[0], b: factors[1]}
    origin, extent = [], []
    for ax in range(3):
        start = shift[ax] - (0.5 / factor[ax] - 0.5)
        n_lr = max(1, int(round(pred.shape[ax] / factor[ax])))
        if abs(start - round(start)) > _TOL:
            raise InputError(pred.path, f"its grid is offset by a fraction of an LR voxel along axis {ax} "
                                        f"({start:.3f}); not a prediction of {lr.path}")
        start = int(round(start))
        if resampled_shape((n_lr, 1, 1), -1, (factor[ax], 1.0))[0] != pred.shape[ax]:
            raise InputError(pred.path, f"shape {pred.shape} does not match an {factor[ax]:g}x refinement of "
                                        f"{lr.path} (shape {lr.shape}) along axis {ax}")
        if start < 0 or start + n_lr > lr.shape[ax]:
            raise InputError(pred.path, f"covers LR voxels {start}:{start + n_lr} along axis {ax}, outside "
                                        f"{lr.path} (shape {lr.shape})")
        origin.append(start)
        extent.append(n_lr)
    return Placement(axis, (factors[0], factors[1]), tuple(origin), tuple(extent))


def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in values)


def choose_slices(n_slices: int, count: int) -> list[int]:
    """``count`` evenly spread slice indices of ``n_slices`` (the centre of each of ``count`` equal parts)."""
    return sorted({int((i + 0.5) * n_slices / count) for i in range(count)})


def display_window(slices: Sequence[np.ndarray]) -> tuple[float, float]:
    """The grey window of one volume: percentiles ``WINDOW_PERCENTILES`` of its voxels over ``slices``."""
    low, high = np.percentile(np.concatenate([np.ravel(s) for s in slices]), WINDOW_PERCENTILES)
    return float(low), float(high)


def to_grey(slice2d: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map ``window`` linearly onto 0..255 (clipped); a flat window shows black."""
    low, high = window
    span = high - low if high > low else 1.0
    return np.round(np.clip((np.asarray(slice2d, np.float64) - low) / span, 0.0, 1.0) * 255.0).astype(np.uint8)


def png_data_uri(grey: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", grey)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _page_asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def render_page(data: dict) -> str:
    """The study page: the template with its CSS, script and the study's JSON inlined."""
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # no "</script>" inside
    page = _page_asset("rating_page.html")
    for marker, text in (("{{study_id}}", data["study_id"]),
                         ("/*{{style}}*/", _page_asset("rating_page.css")),
                         ("/*{{script}}*/", _page_asset("rating_page.js")),
                         ("{{data}}", payload)):  # last: nothing is substituted inside the data
        if marker not in page:
            raise RuntimeError(f"page template lacks {marker}")
        page = page.replace(marker, text)
    return page


def _check_out(out: Path) -> None:
    """Refuse an output path that is a file, or a folder that already holds a study (its key would be lost)."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory; choose an output folder")
    for name in (KEY_NAME, PAGE_NAME):
        if (out / name).exists():
            raise InputError(out / name, "already exists: this folder holds a rating study whose raters' CSVs "
                                         "need its key; choose another --out folder")


def make_study(lr_path: str | os.PathLike, method_specs: Sequence[str], out_dir: str | os.PathLike,
               n_slices: int = 10, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> StudyResult:
    """Write ``OUT/study.html`` (for raters) and ``OUT/key.json`` (kept by the organiser).

    Every input is checked before anything is read in bulk or written: InputError/ConfigError name
    the file or option at fault, and nothing is written.
    """
    say = progress or (lambda message: None)
    if n_slices < 1:
        raise ConfigError(f"--slices must be >= 1, got {n_slices}")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    out = Path(out_dir)
    _check_out(out)  # before any work
    lr = open_volume(lr_path)
    methods = parse_methods(method_specs, lr_path)
    preds = [open_volume(m.mean_path) for m in methods]
    placement = place_on_lr(lr, preds[0])
    for pred in preds[1:]:
        if pred.shape != preds[0].shape:
            raise InputError(pred.path, f"shape {pred.shape} differs from {preds[0].path} {preds[0].shape}; "
                                        "every method must predict the same grid")
        other = place_on_lr(lr, pred)
        if other != placement:
            raise InputError(pred.path, f"lies on a different part of {lr.path}'s grid than {preds[0].path} "
                                        f"(LR origin {other.origin} vs {placement.origin}); every method must "
                                        "predict the same region")
    ax = placement.axis
    available = preds[0].shape[ax]
    if n_slices > available:
        raise InputError(preds[0].path, f"has {available} slices along axis {ax}, fewer than --slices {n_slices}")
    slices = choose_slices(available, n_slices)

    say(f"input {lr.path}: {len(slices)} slices along axis {ax}, {placement.factors[0]:g} x "
        f"{placement.factors[1]:g} in-plane")
    (i0, j0), (ni, nj) = ([placement.origin[d] for d in in_plane_axes(ax)],
                          [placement.lr_extent[d] for d in in_plane_axes(ax)])
    lr_up = [resample_slice(arr[i0:i0 + ni, j0:j0 + nj], placement.factors)
             for _, arr in lr.iter_slices(ax, [placement.origin[ax] + k for k in slices])]
    lr_window = display_window(lr_up)
    lr_images = [png_data_uri(to_grey(s, lr_window)) for s in lr_up]
    windows = {"input (bicubic)": lr_window}
    images: dict[str, list[str]] = {}
    for method, pred in zip(methods, preds):
        say(f"method {method.name}: {pred.path}")
        arrs = [arr for _, arr in pred.iter_slices(ax, slices)]
        windows[method.name] = display_window(arrs)
        images[method.name] = [png_data_uri(to_grey(a, windows[method.name])) for a in arrs]

    pairs = [(m.name, s) for s in range(len(slices)) for m in methods]
    order = np.random.default_rng(seed).permutation(len(pairs))
    width = max(2, len(str(len(pairs))))
    trials = [(f"t{i + 1:0{width}d}", *pairs[p]) for i, p in enumerate(order)]
    digest = hashlib.sha256(json.dumps([seed, str(Path(lr_path).resolve()), list(slices), trials]).encode())
    for _, name, s in trials:
        digest.update(hashlib.sha256(images[name][s].encode()).digest())
    for uri in lr_images:
        digest.update(hashlib.sha256(uri.encode()).digest())
    study_id = digest.hexdigest()[:12]

    data = {
        "study_id": study_id,
        "criteria": [{"key": c, "label": label, "question": q} for c, label, q in CRITERIA],
        "scale": {"min": SCALE[0], "max": SCALE[1], "low": "poor", "high": "excellent"},
        "columns": list(CSV_COLUMNS),
        "lr_images": lr_images,
        "trials": [{"id": tid, "lr": s, "image": images[name][s]} for tid, name, s in trials],
    }
    page = render_page(data)
    key = {
        "format": KEY_FORMAT,
        "study_id": study_id,
        "lr": str(Path(lr_path).resolve()),
        "axis": ax,
        "factors": list(placement.factors),
        "lr_origin": list(placement.origin),
        "slices": [int(k) for k in slices],
        "seed": int(seed),
        "methods": {m.name: str(m.mean_path.resolve()) for m in methods},
        "criteria": [c for c, _, _ in CRITERIA],
        "scale": list(SCALE),
        "display_window": {"rule": f"percentiles {WINDOW_PERCENTILES} of each volume over the study's slices",
                           "windows": {k: list(v) for k, v in windows.items()}},
        "trials": [{"trial": tid, "method": name, "slice": int(slices[s])} for tid, name, s in trials],
    }
    make_output_dir(out)
    key_path, page_path = out / KEY_NAME, out / PAGE_NAME
    atomic_write_text(key_path, json.dumps(key, indent=1) + "\n")  # the key first: a page without it is lost
    atomic_write_text(page_path, page)
    return StudyResult(study_id, page_path, key_path, len(trials), tuple(slices), len(page.encode()))
