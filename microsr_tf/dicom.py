"""DICOM series in: a folder holding one series, read lazily as a 3-D volume with a NIfTI (RAS+) affine.

Array layout, as dcm2niix and nibabel turn DICOM into NIfTI: voxel ``(i, j, k)`` is column ``i`` and
row ``j`` of the ``k``-th slice in order along the slice normal. A slice along the last axis is one
file, so an axial series slices along the last axis as the NIfTI scans do, one file read per slice.

Geometry (DICOM PS3.3 C.7.6.2.1.1): with ``PixelSpacing = (dr, dc)`` (between rows, between columns)
and ``ImageOrientationPatient = (x_row, x_col)`` (the directions in which the column and the row index
grow), voxel ``(i, j, k)`` sits at ``IPP_0 + i dc x_row + j dr x_col + k step`` in the patient's LPS
frame, where ``step`` is the (checked constant) offset between consecutive slice positions. NIfTI's
world frame is RAS, so x and y change sign. Voxel values are the stored pixels through the modality
LUT (``RescaleSlope``/``RescaleIntercept``), file by file.

A series is one file per slice, or one multi-frame file (Enhanced CT and other multi-frame images,
as many cone-beam scanners export): each frame is then a slice, placed and rescaled by its
functional groups (a legacy multi-frame file without them: by its top-level geometry and
SpacingBetweenSlices).

Only the headers are read when the series is opened; pixels are decoded one file (or frame) at a
time as slices are read, so memory does not grow with the number of slices.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array

from .errors import InputError
from .volumes import Volume, other_format_problem

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOLERANCE = 1e-4  # direction cosines of one series may differ by this much between files
POSITION_TOLERANCE = 0.01  # slice positions may stray from an even grid by this fraction of the spacing
_HEADER_DEFER_BYTES = 1024  # values longer than this (the pixels) are skipped when reading headers
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIP_NAMES = {"gdcm": "python-gdcm"}  # import name -> PyPI name where they differ
_PLUGIN_ORDER = ("pylibjpeg", "pyjpegls", "gdcm")  # suggest pure wheels first


@dataclass(frozen=True)
class _SliceFile:
    """One slice: a file, or one frame of a multi-frame file (with that frame's rescale)."""

    path: Path
    position: np.ndarray  # ImagePositionPatient, LPS mm
    frame: int | None = None  # 0-based frame index in a multi-frame file
    slope: float = 1.0  # the frame's RescaleSlope / RescaleIntercept (a single-frame file applies its own LUT)
    intercept: float = 0.0

    @property
    def name(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame + 1}"

    @property
    def where(self) -> str:
        """``"frame N: "`` before a problem that a message names the file with, ``""`` for a whole file."""
        return "" if self.frame is None else f"frame {self.frame + 1}: "


class DicomSeries(Volume):
    """One DICOM series as a :class:`~microsr_tf.volumes.Volume`: same attributes, lazy slice reads.

    Create with :func:`open_series` (or :func:`microsr_tf.volumes.open_volume` on the folder).
    ``header`` is a NIfTI header carrying the series' affine (qform and sform code 1, scanner
    coordinates, mm), so outputs written with it as template are placed in the scanner's frame.
    Reading along the last axis decodes one file per slice; along another axis each group of slices
    decodes every file once (see :meth:`Volume.iter_slices`).
    """

    def __init__(self, path: Path, files: Sequence[_SliceFile], rows: int, columns: int,
                 spacing: tuple[float, float, float], affine: np.ndarray, dtype: np.dtype):
        self.path = path
        self.files = tuple(files)
        self.shape = (int(columns), int(rows), len(self.files))
        self.spacing = tuple(float(s) for s in spacing)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.dtype = np.dtype(dtype)
        header = nib.Nifti1Header()
        header.set_data_shape(self.shape)
        header.set_qform(self.affine, code=1)
        header.set_sform(self.affine, code=1)
        header.set_xyzt_units("mm")
        self.header = header

    def __repr__(self) -> str:
        return (f"DicomSeries({os.fspath(self.path)!r}, shape={self.shape}, spacing={self.spacing}, "
                f"dtype={self.dtype})")

    def close(self) -> None:
        """Nothing to release: each slice read opens and closes its own file."""

    def _read_last(self, k: int) -> np.ndarray:
        return self._pixels(k)

    def _gather(self, ax: int, ks: Sequence[int]) -> np.ndarray:
        """Slices ``ks`` along axis 0 or 1, assembled by decoding each file once."""
        h, w = self.slice_shape(ax)
        out = np.empty((len(ks), h, w), dtype=np.float32)
        idx = np.asarray(ks)
        for z in range(self.shape[2]):
            plane = self._pixels(z)
            out[:, :, z] = plane[idx] if ax == 0 else plane[:, idx].T
        return out

    def _pixels(self, k: int) -> np.ndarray:
        """Slice ``k`` along the last axis: the file's pixels through its modality LUT (a frame's: through
        its rescale, that frame alone decoded), as (columns, rows)."""
        f = self.files[k]
        path = f.path
        try:
            if f.frame is None:
                ds = pydicom.dcmread(path)
                values = apply_modality_lut(ds.pixel_array, ds)
            else:
                values = pixel_array(path, index=f.frame).astype(np.float64) * f.slope + f.intercept
        except Exception as exc:  # pydicom and its decoders signal damaged pixel data with many types
            raise InputError(path, f"cannot read the pixel data ({_first_line(exc)})") from None
        expected = (self.shape[1], self.shape[0])
        if values.shape != expected:
            raise InputError(path, f"pixel data has shape {values.shape}, expected {expected} (rows, columns)")
        with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become Inf: _finite names them
            return np.asarray(values, dtype=np.float32).T

    def _scaling(self) -> str:
        return "RescaleSlope/RescaleIntercept"


def frame_count(path: str | os.PathLike) -> int:
    """NumberOfFrames of a DICOM file (1 when absent or unreadable), read from its header alone."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
    except Exception:  # not DICOM after all, or damaged: treated as a single slice, refused by its reader
        return 1
    try:
        return _n_frames(ds)
    except (TypeError, ValueError):
        return 1


def open_series(folder: str | os.PathLike) -> DicomSeries:
    """Open the DICOM series in ``folder`` (its headers only) and check it forms one evenly spaced volume.
    ``folder`` may also be one DICOM file: a multi-frame file is then the whole series.

    Hidden files are ignored. InputError, naming the folder or the offending file, for: an empty
    folder, a subfolder, a file that is not DICOM or holds no image, several series, a multi-frame file
    beside other files, colour images, files (or frames) that disagree in size, pixel spacing or
    orientation, missing geometry,
    duplicate, missing or unevenly spaced slices, and compressed pixel data that no installed
    decoder reads (the message names the package to install).
    """
    folder = Path(folder)
    entries = [folder] if folder.is_file() else sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    subfolders = [p for p in entries if p.is_dir()]
    if subfolders:
        raise InputError(folder, f"holds the subfolder {subfolders[0].name!r}; a series folder must hold only "
                                 "the files of one DICOM series")
    if not entries:
        raise InputError(folder, "is empty; expected the files of one DICOM series")

    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path in entries:
        ds = _read_header(path)
        series[str(ds.get("SeriesInstanceUID", ""))].append((path, ds))
    if len(series) > 1:
        parts = ", ".join(f"{len(members)} files of {_series_label(uid, members[0][1])}"
                          for uid, members in series.items())
        raise InputError(folder, f"holds {len(series)} DICOM series ({parts}); put each series in its own folder")
    (members,) = series.values()
    multi = [path for path, ds in members if _n_frames(ds) > 1]
    if multi and len(members) > 1:
        raise InputError(multi[0], f"is a multi-frame image ({_n_frames(dict(members)[multi[0]])} frames) beside "
                                   f"{len(members) - 1} other file(s) of its series; a series folder holds either "
                                   "one multi-frame file or one file per slice")

    first_path, first = members[0]
    rows, columns = int(first.Rows), int(first.Columns)
    if multi:
        files, pixel_spacing, orientation = _frames(first_path, first)
        _check_decoder(first_path, str(first.file_meta.get("TransferSyntaxUID", "")))
    else:
        files, pixel_spacing, orientation = _single_frame_files(members, rows, columns)
    return _series_volume(folder, files, first, rows, columns, pixel_spacing, orientation)


def _single_frame_files(members: list[tuple[Path, pydicom.Dataset]], rows: int, columns: int
                        ) -> tuple[list[_SliceFile], np.ndarray, np.ndarray]:
    """One slice per file, checked to share size, PixelSpacing and ImageOrientationPatient."""
    first_path, first = members[0]
    pixel_spacing = _floats(first, "PixelSpacing", 2, first_path)
    orientation = _floats(first, "ImageOrientationPatient", 6, first_path)
    syntaxes = {}
    files = []
    for path, ds in members:
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise InputError(path, f"is {ds.Rows} x {ds.Columns} pixels but {first_path.name} is {rows} x {columns}; "
                                   "the slices of one series must have one size")
        spacing_k = _floats(ds, "PixelSpacing", 2, path)
        if np.abs(spacing_k - pixel_spacing).max() > 1e-6 * pixel_spacing.max():
            raise InputError(path, f"has PixelSpacing {_fmt(spacing_k)} but {first_path.name} has "
                                   f"{_fmt(pixel_spacing)}")
        orientation_k = _floats(ds, "ImageOrientationPatient", 6, path)
        if np.abs(orientation_k - orientation).max() > ORIENTATION_TOLERANCE:
            raise InputError(path, f"has ImageOrientationPatient {_fmt(orientation_k)} but {first_path.name} has "
                                   f"{_fmt(orientation)} (a localizer mixed into the series?)")
        syntaxes.setdefault(str(ds.file_meta.get("TransferSyntaxUID", "")), path)
        files.append(_SliceFile(path, _floats(ds, "ImagePositionPatient", 3, path)))
    for syntax, path in syntaxes.items():
        _check_decoder(path, syntax)
    return files, pixel_spacing, orientation


def _n_frames(ds: pydicom.Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _frame_item(ds: pydicom.Dataset, frame: int, sequence: str) -> pydicom.Dataset | None:
    """The item of a functional-group ``sequence`` for ``frame``: the per-frame one, else the shared one."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items:
            return items[0]
    return None


def _frames(path: Path, ds: pydicom.Dataset) -> tuple[list[_SliceFile], np.ndarray, np.ndarray]:
    """The frames of a multi-frame file as slices. An enhanced file (Enhanced CT, PS3.3 C.7.6.16) places
    each frame through its functional groups (Plane Position, Plane Orientation, Pixel Measures, Pixel
    Value Transformation; per frame, else shared); a legacy one by its top-level ImagePositionPatient,
    ImageOrientationPatient and PixelSpacing, frames SpacingBetweenSlices apart along the slice normal."""
    n = _n_frames(ds)
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        gap = ds.get("SpacingBetweenSlices")
        if not gap or float(gap) <= 0:
            raise InputError(path, f"is a multi-frame image ({n} frames) without functional groups or a "
                                   "positive SpacingBetweenSlices; the frames cannot be placed in space")
        spacing = _floats(ds, "PixelSpacing", 2, path)
        orientation = _floats(ds, "ImageOrientationPatient", 6, path)
        x_row, x_col = _orientation(path, orientation)
        origin, step = _floats(ds, "ImagePositionPatient", 3, path), np.cross(x_row, x_col) * float(gap)
        slope, intercept = _rescale(ds)
        return [_SliceFile(path, origin + frame * step, frame, slope, intercept) for frame in range(n)], \
            spacing, orientation
    if len(ds.get("PerFrameFunctionalGroupsSequence") or ()) not in (0, n):
        raise InputError(path, f"has {n} frames but {len(ds.PerFrameFunctionalGroupsSequence)} per-frame "
                               "functional groups")
    files, spacings, orientations = [], [], []
    for frame in range(n):
        where = f"frame {frame + 1}: "
        measures = _frame_item(ds, frame, "PixelMeasuresSequence")
        plane = _frame_item(ds, frame, "PlaneOrientationSequence")
        position = _frame_item(ds, frame, "PlanePositionSequence")
        for item, sequence in ((measures, "PixelMeasuresSequence"), (plane, "PlaneOrientationSequence"),
                               (position, "PlanePositionSequence")):
            if item is None:
                raise InputError(path, f"{where}lacks {sequence}; cannot place the frame in space")
        spacings.append(_floats(measures, "PixelSpacing", 2, path, where))
        orientations.append(_floats(plane, "ImageOrientationPatient", 6, path, where))
        ipp = _floats(position, "ImagePositionPatient", 3, path, where)
        slope, intercept = _rescale(_frame_item(ds, frame, "PixelValueTransformationSequence") or ds)
        files.append(_SliceFile(path, ipp, frame, slope, intercept))
        if np.abs(spacings[-1] - spacings[0]).max() > 1e-6 * spacings[0].max():
            raise InputError(path, f"{where}PixelSpacing {_fmt(spacings[-1])} differs from frame 1's "
                                   f"{_fmt(spacings[0])}")
        if np.abs(orientations[-1] - orientations[0]).max() > ORIENTATION_TOLERANCE:
            raise InputError(path, f"{where}ImageOrientationPatient {_fmt(orientations[-1])} differs from "
                                   f"frame 1's {_fmt(orientations[0])}")
    return files, spacings[0], orientations[0]


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    """``(RescaleSlope, RescaleIntercept)`` of a dataset or functional-group item; ``(1, 0)`` when absent."""
    return float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)


def _series_volume(folder: Path, files: list[_SliceFile], first: pydicom.Dataset, rows: int, columns: int,
                   pixel_spacing: np.ndarray, orientation: np.ndarray) -> DicomSeries:
    """The volume of checked slices: ordered along the slice normal, on an even grid, with its affine."""
    first_path = files[0].path
    if np.any(pixel_spacing <= 0):
        raise InputError(first_path, f"PixelSpacing {_fmt(pixel_spacing)} must be positive")
    x_row, x_col = _orientation(first_path, orientation)
    normal = np.cross(x_row, x_col)
    files.sort(key=lambda f: float(f.position @ normal))
    step = _slice_step(folder, files, normal, first)
    d_row, d_col = pixel_spacing
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = x_row * d_col
    affine_lps[:3, 1] = x_col * d_row
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = files[0].position
    bits = int(first.BitsAllocated)
    dtype = np.dtype(f"{'i' if int(first.get('PixelRepresentation', 0)) else 'u'}{max(1, bits // 8)}")
    return DicomSeries(folder, files, rows, columns, (float(d_col), float(d_row), float(np.linalg.norm(step))),
                       LPS_TO_RAS @ affine_lps, dtype)


def _read_header(path: Path) -> pydicom.Dataset:
    """Header of one file (pixels skipped), checked to describe one grey-scale image slice."""
    if not path.is_file():
        raise InputError(path, "not a regular file; a series folder must hold only the files of one DICOM series")
    try:
        ds = pydicom.dcmread(path, defer_size=_HEADER_DEFER_BYTES)
    except InvalidDicomError:
        raise InputError(path, other_format_problem(path) or "is not a DICOM file; a series folder must hold "
                                                             "only the files of one DICOM series") from None
    except Exception as exc:  # truncated or malformed headers surface as many exception types
        raise InputError(path, f"unreadable DICOM file ({_first_line(exc)})") from None
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        kind = ds.get("SOPClassUID")
        kind = getattr(kind, "name", None) or kind or "unknown SOP class"
        raise InputError(path, f"holds no image ({kind}); a series folder must hold only image slices")
    if "PixelData" not in ds:
        raise InputError(path, "holds floating-point pixel data, which is not read; expected a CT image slice")
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise InputError(path, f"has {samples} samples per pixel ({ds.get('PhotometricInterpretation', 'colour')}); "
                               "expected a grey-scale image")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if keyword not in ds:
            raise InputError(path, f"lacks {keyword}")
    return ds


def _floats(ds: pydicom.Dataset, keyword: str, n: int, path: Path, where: str = "") -> np.ndarray:
    """A multi-valued decimal attribute as ``n`` finite floats; InputError (``where`` before the problem,
    e.g. ``"frame 3: "``) if missing or malformed."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise InputError(path, f"{where}lacks {keyword}; cannot place the slice in space")
    try:
        items = value if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
        out = np.array([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(path, f"{where}{keyword} {value!r} is not numeric") from None
    if out.shape != (n,) or not np.isfinite(out).all():
        raise InputError(path, f"{where}{keyword} {value!r} should be {n} finite numbers")
    return out


def _orientation(path: Path, iop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines, normalised; InputError unless they are (nearly) orthonormal."""
    x_row, x_col = iop[:3], iop[3:]
    norms = np.linalg.norm(x_row), np.linalg.norm(x_col)
    if min(norms) < 1e-6 or abs(norms[0] - 1) > 1e-3 or abs(norms[1] - 1) > 1e-3 or abs(x_row @ x_col) > 1e-3:
        raise InputError(path, f"ImageOrientationPatient {_fmt(iop)} is not two orthogonal unit vectors")
    return x_row / norms[0], x_col / norms[1]


def _slice_step(folder: Path, files: list[_SliceFile], normal: np.ndarray, first: pydicom.Dataset) -> np.ndarray:
    """The offset (LPS mm) between consecutive slices, after checking the positions form an even grid."""
    if len(files) == 1:
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
        if not thickness or float(thickness) <= 0:
            raise InputError(files[0].path, "is a single slice without SliceThickness or SpacingBetweenSlices; "
                                            "the slice spacing is unknown")
        return normal * float(thickness)
    along = np.array([f.position @ normal for f in files])
    gaps = np.diff(along)
    typical = float(np.median(gaps))
    tol = POSITION_TOLERANCE * max(typical, 0.0)
    same = np.flatnonzero(gaps <= max(tol, 1e-6))
    if same.size:
        a, b = files[same[0]], files[same[0] + 1]
        raise InputError(folder, f"{a.name} and {b.name} lie at the same slice position "
                                 f"{along[same[0]]:.4g} mm (several acquisitions or echoes in one series?)")
    if np.abs(gaps - typical).max() > tol:
        worst = int(np.argmax(np.abs(gaps - typical)))
        a, b = files[worst], files[worst + 1]
        ratio = gaps[worst] / typical
        if abs(ratio - round(ratio)) <= POSITION_TOLERANCE and round(ratio) >= 2:
            problem = (f"{round(ratio) - 1} slice(s) missing between {a.name} and {b.name} "
                       f"({gaps[worst]:.4g} mm apart where the other slices are {typical:.4g} mm apart)")
        else:
            problem = (f"unevenly spaced slices: {a.name} and {b.name} are {gaps[worst]:.4g} mm apart "
                       f"where the other slices are {typical:.4g} mm apart")
        raise InputError(folder, problem)
    step = (files[-1].position - files[0].position) / (len(files) - 1)
    for k, f in enumerate(files):
        stray = float(np.linalg.norm(f.position - (files[0].position + k * step)))
        if stray > tol:
            raise InputError(f.path, f"{f.where}ImagePositionPatient {_fmt(f.position)} lies {stray:.4g} mm off "
                                     "the line through the other slices' positions")
    return step


def _check_decoder(path: Path, syntax: str) -> None:
    """InputError naming what to install when the pixel data's transfer syntax has no usable decoder."""
    uid = pydicom.uid.UID(syntax)
    if not syntax or not uid.is_compressed:
        return
    name = uid.name if uid.is_transfer_syntax else syntax
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise InputError(path, f"pixel data is compressed as {name}, which pydicom cannot decode; "
                               "convert the series to an uncompressed transfer syntax") from None
    if not decoder.is_available:
        raise InputError(path, f"pixel data is compressed as {name} and no installed decoder reads it; "
                               f"install one: {_install_hint(decoder.missing_dependencies)}")


def _install_hint(missing: Sequence[str]) -> str:
    """``pip install ...`` alternatives from pydicom's ``missing_dependencies`` lines
    (``"pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"``)."""
    options = {}
    for line in missing:
        label, _, requires = line.partition(" - requires ")
        names = [re.split(r"[<>=!~ ]", part.strip(), maxsplit=1)[0]
                 for part in re.split(r",| and ", requires) if part.strip()]
        names = [_PIP_NAMES.get(n, n) for n in names if n and n != "numpy"]
        if names:
            options[label.strip()] = "pip install " + " ".join(names)
    ordered = sorted(options, key=lambda k: _PLUGIN_ORDER.index(k) if k in _PLUGIN_ORDER else len(_PLUGIN_ORDER))
    return " or ".join(f"'{options[k]}'" for k in ordered) or "a pydicom pixel-data plugin"


def _series_label(uid: str, ds: pydicom.Dataset) -> str:
    description = str(ds.get("SeriesDescription", "")).strip()
    label = f"series {uid or '(no SeriesInstanceUID)'}"
    return f"{label} '{description}'" if description else label


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
