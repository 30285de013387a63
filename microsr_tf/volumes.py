"""Volumes in and out: lazy slice-by-slice reading with validation, resampled grids, atomic NIfTI writing.

Inputs are NIfTI files or folders holding one DICOM series (:mod:`microsr_tf.dicom`); both open as a
:class:`Volume` through :func:`open_volume`. Outputs are always NIfTI.

Reading never loads a whole volume: slices come through nibabel's array proxy, so a 1828^3 micro-CT
(12 GB as int16) streams in bounded memory. Slices along the last axis are contiguous on disk and are
read one at a time; slices along another axis gather from the whole file, so they are assembled from
slabs of the last axis (see :meth:`Volume.iter_slices` for the cost).

Writing goes to a hidden temporary file in the destination directory through a ``np.memmap`` and is
renamed into place only when every slice has been written, so an interrupted run leaves nothing at
the final path.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import logging
import os
import shutil
import struct
import weakref
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.openers import ImageOpener
from nibabel.nifti1 import Nifti1Header
from nibabel.nifti2 import Nifti2Header

from .errors import InputError
from .files import remove_quietly, temp_file_beside

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLAB_BYTES = 64 << 20  # bytes of one last-axis slab read when gathering slices along another axis
GATHER_BYTES = 256 << 20  # bytes of float32 output slices gathered per pass over the file
_GZIP_CHUNK = 16 << 20
_NIFTI1_MAX_DIM = 32767  # dim[] is int16 in NIfTI-1


def is_nifti_name(path: str | os.PathLike) -> bool:
    """True for names ending in ``.nii`` or ``.nii.gz`` (any case)."""
    return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """The file name without its ``.nii`` / ``.nii.gz`` (or DICOM ``.dcm``) suffix (``scan.nii.gz`` -> ``scan``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def in_plane_axes(axis: int) -> tuple[int, int]:
    """The two axes of a 3-D volume other than ``axis``, in their original order."""
    ax = _normalize_axis(axis)
    a, b = (i for i in range(3) if i != ax)
    return a, b


def _normalize_axis(axis: int) -> int:
    if not -3 <= int(axis) <= 2:
        raise ValueError(f"axis must be in [-3, 2] for a 3-D volume, got {axis}")
    return int(axis) % 3


# Largest voxel magnitude accepted: bicubic overshoot and the statistics' sums of a float32 slice stay far
# below float32's 3.4e38. No CT unit comes near it.
MAX_MAGNITUDE = 1e30

_MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 0.001}  # "unknown" is read as mm, as nibabel does


class Volume:
    """A validated 3-D NIfTI volume whose voxels are read lazily, one slice at a time.

    Create with :func:`open_volume`. Slices are 2-D ``float32`` arrays with ``scl_slope``/``scl_inter``
    applied; a slice holding NaN or Inf raises :class:`InputError`. Other formats subclass it and
    override ``_read_last``/``_gather`` (:class:`microsr_tf.dicom.DicomSeries`). A ``.nii.gz`` keeps one
    decompression stream open, so reading slices in increasing order along the last axis costs one
    pass over the file; call :meth:`close` (or use ``with``) to release it early.
    """

    def __init__(self, path: Path, img: nib.Nifti1Image, shape: tuple[int, int, int]):
        self.path = path
        self.shape = shape
        self.header = img.header
        self.affine = np.array(img.affine, dtype=np.float64)
        # Spacing in mm whatever the header's spatial unit (micro-CT is often stored in microns);
        # the affine stays in the file's own units, so outputs keep them too.
        to_mm = _MM_PER_UNIT.get(img.header.get_xyzt_units()[0], 1.0)
        self.spacing = tuple(float(z) * to_mm for z in img.header.get_zooms()[:3])
        self.dtype = np.dtype(img.get_data_dtype())
        proxy = img.dataobj
        self._spec = (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
        self._proxy: ArrayProxy | None = None  # opened on first read, kept open until close()
        self._trailing = (0,) if len(img.shape) == 4 else ()  # index of a squeezed singleton 4th dim
        self._gzip = path.name.lower().endswith(".gz")

    def __repr__(self) -> str:
        return f"Volume({os.fspath(self.path)!r}, shape={self.shape}, spacing={self.spacing}, dtype={self.dtype})"

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the open file handle; later reads reopen the file."""
        self._proxy = None  # ArrayProxy closes its file when dropped

    def n_slices(self, axis: int = -1) -> int:
        """Number of slices along ``axis``."""
        return self.shape[_normalize_axis(axis)]

    def slice_shape(self, axis: int = -1) -> tuple[int, int]:
        """Shape of one slice along ``axis`` (the two in-plane sizes)."""
        a, b = in_plane_axes(axis)
        return self.shape[a], self.shape[b]

    def in_plane_spacing(self, axis: int = -1) -> tuple[float, float]:
        """Voxel spacing (mm) of the two in-plane axes of slices along ``axis``."""
        a, b = in_plane_axes(axis)
        return self.spacing[a], self.spacing[b]

    def read_slice(self, k: int, axis: int = -1) -> np.ndarray:
        """Slice ``k`` along ``axis`` as 2-D float32; InputError if it holds NaN/Inf or cannot be read.

        Along a non-last axis each call is a pass over the file; use :meth:`iter_slices` for many.
        """
        ax = _normalize_axis(axis)
        k = self._check_index(k, ax)
        if ax == 2:
            return self._finite(self._read_last(k), k, ax)
        return self._finite(self._gather(ax, [k])[0], k, ax)

    def iter_slices(self, axis: int = -1, indices: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(k, slice2d)`` for ``indices`` (default all) along ``axis``, in increasing ``k``.

        Along the last axis each slice is one contiguous read. Along another axis every slice gathers
        from the whole file, so slices are assembled in groups of up to ``GATHER_BYTES`` from slabs of
        the last axis: one pass over the file (one decompression for ``.nii.gz``) per group instead
        of one per slice. Memory stays bounded by ``GATHER_BYTES + SLAB_BYTES``; the price is that
        reading every slice of a large volume along a non-last axis takes several passes.
        """
        ax = _normalize_axis(axis)
        ks = range(self.shape[ax]) if indices is None else sorted({self._check_index(k, ax) for k in indices})
        if ax == 2:
            for k in ks:
                yield k, self._finite(self._read_last(k), k, ax)
            return
        h, w = self.slice_shape(ax)
        per_group = max(1, GATHER_BYTES // (h * w * 4))
        ks = list(ks)
        for start in range(0, len(ks), per_group):
            group = ks[start:start + per_group]
            for k, arr in zip(group, self._gather(ax, group)):
                yield k, self._finite(arr, k, ax)

    def _check_index(self, k: int, ax: int) -> int:
        n = self.shape[ax]
        if not -n <= int(k) < n:
            raise IndexError(f"slice {k} out of range for axis {ax} with {n} slices ({self.path})")
        return int(k) % n

    def _read(self, slicer: tuple) -> np.ndarray:
        """Read through the array proxy, turning I/O and decompression failures into InputError.

        A read that reaches the last slice of a ``.nii.gz`` also reads the rest of the stream, so that
        gzip checks its CRC-32: a corrupt file whose deflate data still decodes (to wrong voxels) is
        refused once it has been read to the end, as a whole-volume read always is.
        """
        if self._proxy is None:
            self._proxy = ArrayProxy(self.path, self._spec, keep_file_open=True)
        try:
            arr = np.asarray(self._proxy[slicer + self._trailing])
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            raise InputError(self.path, f"cannot read voxel data ({_first_line(exc)})") from None
        if self._gzip and _reaches_end(slicer[2], self.shape[2]):
            try:
                with self._proxy._get_fileobj() as fh:  # the proxy's open stream, now past the voxels
                    while fh.read(1 << 16):  # normally nothing is left but the trailer
                        pass
            except (OSError, EOFError, zlib.error) as exc:
                raise InputError(self.path, "corrupt gzip stream: its end-of-file check (CRC-32, length) fails, so "
                                            f"the voxels read cannot be trusted ({_first_line(exc)})") from None
        return arr

    def _read_last(self, k: int) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become Inf: _finite names them
            return self._read((slice(None), slice(None), k)).astype(np.float32)

    def _gather(self, ax: int, ks: Sequence[int]) -> np.ndarray:
        """Slices ``ks`` along axis 0 or 1, assembled from slabs of the last axis in one pass."""
        nx, ny, nz = self.shape
        h, w = self.slice_shape(ax)
        out = np.empty((len(ks), h, w), dtype=np.float32)
        step = max(1, SLAB_BYTES // (nx * ny * 8))
        idx = np.asarray(ks)
        for z0 in range(0, nz, step):
            z1 = min(nz, z0 + step)
            slab = self._read((slice(None), slice(None), slice(z0, z1)))
            with np.errstate(over="ignore", invalid="ignore"):
                out[:, :, z0:z1] = slab[idx] if ax == 0 else np.moveaxis(slab[:, idx], 1, 0)
        return out

    def _scaling(self) -> str:
        """The file's intensity scaling, as its header names it (for messages)."""
        slope, inter = self._spec[3], self._spec[4]
        return f"scl_slope {slope:g}, scl_inter {inter:g}"

    def _finite(self, arr: np.ndarray, k: int, ax: int) -> np.ndarray:
        """``arr`` when every voxel is finite and within :data:`MAX_MAGNITUDE`; else InputError saying which."""
        if not np.isfinite(arr).all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(np.isinf(arr).sum())
            if n_nan == 0 and self.dtype.kind in "iu":  # stored integers are finite: the scaling overflowed
                raise InputError(self.path, f"the intensity scaling ({self._scaling()}) takes slice {k} along axis "
                                            f"{ax} beyond the float32 range; the scaling is wrong")
            raise InputError(self.path, f"slice {k} along axis {ax} has {n_nan} NaN and {n_inf} Inf voxels")
        peak = float(np.abs(arr).max())
        if peak > MAX_MAGNITUDE:
            raise InputError(self.path, f"slice {k} along axis {ax} has a voxel of magnitude {peak:.3g}; values "
                                        f"beyond {MAX_MAGNITUDE:.0e} cannot be resampled in float32: rescale the image")
        return arr


def _reaches_end(index: int | slice, n: int) -> bool:
    """Whether a last-axis index (an int or a step-1 slice) includes the last slice ``n - 1``."""
    if isinstance(index, slice):
        return index.indices(n)[1] >= n
    return int(index) % n == n - 1


def open_volume(path: str | os.PathLike) -> Volume:
    """Open and validate a 3-D volume without reading its voxels: a NIfTI-1/NIfTI-2 file (``.nii`` or
    ``.nii.gz``), a folder holding one DICOM series, or one multi-frame DICOM file
    (:func:`microsr_tf.dicom.open_series`).

    Raises InputError for a missing file, a file that is not NIfTI, a truncated file, a true 4-D,
    2-D or >4-D image, a zero-length axis, non-positive spacing, or complex/RGB/non-numeric voxels.
    A trailing singleton 4th dimension is accepted and squeezed. NaN/Inf are checked as slices are read.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        from .dicom import open_series  # pydicom is imported only when a series is opened

        return open_series(path)
    if not path.is_file():
        raise InputError(path, "not a file (expected a .nii or .nii.gz volume, or a DICOM series folder)")
    if not is_nifti_name(path):
        if _has_dicom_marker(path):  # a multi-frame DICOM file is a whole volume
            from .dicom import open_series

            return open_series(path)
        raise InputError(path, other_format_problem(path) or "not a NIfTI file name (expected .nii or .nii.gz) "
                                                            "nor a DICOM file")
    _check_compression_matches_name(path)
    try:
        with _nibabel_fixes_quiet():
            img = nib.load(path)
    except Exception as exc:  # nibabel signals unparsable input with many exception types
        raise InputError(path, f"not a readable NIfTI file ({_first_line(exc)})") from None
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image derives from Nifti1Image
        raise InputError(path, f"not a single-file NIfTI image (read as {type(img).__name__})")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3:
        raise InputError(path, f"is {len(shape)}-D (shape {shape}); expected a 3-D volume")
    if len(shape) > 4:
        raise InputError(path, f"has {len(shape)} dimensions (shape {shape}); expected a 3-D volume")
    if min(shape) <= 0:
        raise InputError(path, f"has a {'zero-length' if 0 in shape else 'negative'} axis in its header's dim "
                               f"(shape {shape})")
    if len(shape) == 4 and shape[3] != 1:
        raise InputError(path, f"is 4-D with {shape[3]} volumes (shape {shape}); expected a single 3-D volume")
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise InputError(path, f"unsupported voxel type {dtype} (expected real integer or floating-point voxels, "
                               "not complex or RGB)")
    # nibabel silently turns a pixdim of 0 into 1 mm; the spacing of such a file is unknown, not 1 mm.
    # A negative pixdim is read as its absolute value, as nibabel and other NIfTI readers do.
    raw = _raw_pixdim(path, type(img.header))
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    if not (np.isfinite(raw).all() and (raw != 0).all() and (zooms > 0).all()):
        raise InputError(path, f"voxel spacing (pixdim) {tuple(raw.tolist())} must be non-zero and finite")
    _check_sform_spacing(path, img.header, zooms)
    _check_complete(path, img, dtype)
    return Volume(path, img, shape[:3])


def _check_sform_spacing(path: Path, header: Nifti1Header, zooms: np.ndarray) -> None:
    """Refuse an sform whose axes are not pixdim long: the geometry (the sform, which nibabel and
    viewers use) and the voxel size (pixdim) would then disagree, and the upsampling factor with them.
    ITK refuses such files too; a qform is built from pixdim, so it always agrees."""
    sform, code = header.get_sform(coded=True)
    if not code:
        return
    lengths = np.linalg.norm(sform[:3, :3], axis=0)
    if not np.allclose(lengths, zooms, rtol=1e-4, atol=0):
        unit = header.get_xyzt_units()[0]
        unit = "" if unit == "unknown" else f" {unit}"
        show = lambda v: " x ".join(f"{x:.6g}" for x in v)  # noqa: E731
        raise InputError(path, f"voxel size is ambiguous: pixdim says {show(zooms)}{unit} but the sform's axes are "
                               f"{show(lengths)}{unit} long; make pixdim and the sform agree before use")


_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".bmp", ".jpg", ".jpeg")
_VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".img", ".vtk")


def other_format_problem(path: str | os.PathLike) -> str | None:
    """What to say of a file in a format this tool does not read but a user may well hold (a micro-CT
    slice stack, a NRRD or MetaImage volume), naming a conversion; None for other names."""
    suffix = Path(path).suffix.lower()
    if suffix in _IMAGE_SUFFIXES:
        return (f"is a {suffix} image, not a volume: a slice stack carries no voxel size; convert the stack to "
                "NIfTI with its voxel size (e.g. with 3D Slicer or SimpleITK)")
    if suffix in _VOLUME_SUFFIXES:
        return (f"is a {suffix} volume, which is not read; convert it to NIfTI, e.g. with SimpleITK: "
                "sitk.WriteImage(sitk.ReadImage(path), 'scan.nii.gz')")
    return None


def _check_compression_matches_name(path: Path) -> None:
    """Refuse a NIfTI file whose name says the opposite of its bytes about gzip (readers go by the
    name), saying which name fits; other unreadable bytes are left to the NIfTI reader's message."""
    def nifti_start(head: bytes) -> bool:  # sizeof_hdr of NIfTI-1 (348) or NIfTI-2 (540), either byte order
        return len(head) >= 4 and any(struct.unpack(order + "i", head[:4])[0] in (348, 540) for order in "<>")

    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            gzipped = head[:2] == b"\x1f\x8b"
            if gzipped:
                fh.seek(0)
                with gzip.GzipFile(fileobj=fh) as inner:
                    head = inner.read(4)
    except (OSError, EOFError, zlib.error):
        return  # unreadable: the NIfTI reader names the problem
    named_gz = path.name.lower().endswith(".gz")
    if named_gz and not gzipped and nifti_start(head):
        raise InputError(path, "is named .nii.gz but is not gzip-compressed; rename it to .nii")
    if gzipped and not named_gz and nifti_start(head):
        raise InputError(path, "is gzip-compressed but named .nii; rename it to .nii.gz")


@contextlib.contextmanager
def _nibabel_fixes_quiet() -> Iterator[None]:
    """Keep nibabel from printing the header repairs it makes while loading (for example
    "pixdim[1,2,3] should be positive"); the fields that matter are checked by :func:`open_volume`."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _raw_pixdim(path: Path, header_class: type) -> np.ndarray:
    """``pixdim[1:4]`` as stored in the file, before nibabel's load-time repairs."""
    with ImageOpener(path) as fh:
        header = header_class.from_fileobj(fh, check=False)
    return np.asarray(header["pixdim"][1:4], dtype=np.float64)


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (and its parents) if needed and check it can be written.

    InputError names the folder when it is a file, cannot be created, or is not writable, before
    any work is done.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "exists and is not a directory; choose an output folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(path, f"cannot create the output folder ({exc.strerror or _first_line(exc)})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(path, "output folder is not writable")
    return path


def _check_complete(path: Path, img: nib.Nifti1Image, dtype: np.dtype) -> None:
    """Refuse a file too short for the voxels its header declares, without holding them in memory.

    An uncompressed file is checked by size. For gzip the trailer's ISIZE (uncompressed size mod 2**32)
    decides in the common case at the cost of reading 4 bytes; only when it disagrees (a truncated
    file, or a multi-member gzip) is the stream decompressed, chunk by chunk, to count its bytes.
    """
    needed = int(img.dataobj.offset) + int(np.prod(img.dataobj.shape)) * dtype.itemsize
    if not path.name.lower().endswith(".gz"):
        size = path.stat().st_size
        if size < needed:
            raise InputError(path, f"truncated: {size} bytes but the header needs {needed}")
        return
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        (isize,) = struct.unpack("<I", fh.read(4))
    if isize == needed % (1 << 32):
        return
    count = 0
    try:
        with gzip.open(path, "rb") as fh:
            while count < needed:
                chunk = fh.read(_GZIP_CHUNK)
                if not chunk:
                    break
                count += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(path, f"truncated or corrupt gzip stream ({_first_line(exc)})") from None
    if count < needed:
        raise InputError(path, f"truncated: {count} bytes after decompression but the header needs {needed}")


def find_volumes(directory: str | os.PathLike) -> list[Path]:
    """The volumes of a training folder, sorted by name (hidden entries ignored); InputError if none.

    Each ``.nii``/``.nii.gz`` file directly in ``directory`` is one volume, and so is each subfolder,
    which must hold one DICOM series (checked when it is opened), and each multi-frame DICOM file.
    Other files are ignored; single-slice DICOM files directly in the folder are refused with a hint, and
    so is a broken link where a volume would be (a NIfTI or ``.dcm`` name, or no suffix: a series folder),
    rather than training on one volume fewer without a word.
    """
    directory = Path(directory)
    if not directory.exists():
        raise InputError(directory, "directory not found")
    if not directory.is_dir():
        raise InputError(directory, "not a directory")
    entries = [p for p in directory.iterdir() if not p.name.startswith(".")]
    broken = sorted(p for p in entries if p.is_symlink() and not p.exists()
                    and (is_nifti_name(p) or p.suffix.lower() in ("", ".dcm")))
    if broken:
        raise InputError(broken[0], f"is a broken link (to {os.readlink(broken[0])}, which does not exist); "
                                    "point it at the volume or remove it")
    dicom = [p for p in entries if p.is_file() and not is_nifti_name(p) and _has_dicom_marker(p)]
    if dicom:
        from .dicom import frame_count  # pydicom is imported only when a folder holds DICOM files

        single = [p for p in dicom if frame_count(p) <= 1]
        if single:
            raise InputError(directory, f"holds DICOM slice files ({single[0].name}) directly; put each series "
                                        "in its own subfolder (one subfolder is one volume; a multi-frame file "
                                        "is one volume by itself)")
    found = sorted(p for p in entries if p.is_dir() or (p.is_file() and is_nifti_name(p)) or p in dicom)
    if not found:
        problems = ((p, other_format_problem(p)) for p in sorted(entries))
        other, problem = next(((p, q) for p, q in problems if q), (None, None))
        if other is not None:
            raise InputError(directory, f"holds no volume this tool reads: {other.name} {problem}")
        raise InputError(directory, "no .nii or .nii.gz volumes, DICOM series subfolders or multi-frame DICOM "
                                    "files found")
    return found


def _has_dicom_marker(path: Path) -> bool:
    """True for a DICOM Part 10 file: ``DICM`` after the 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _scaled_size(n: int, f: float) -> int:
    """In-plane size after refining by ``f``: round(n * f), half to even, at least 1."""
    return max(1, int(round(n * float(f))))


def resampled_shape(shape: Sequence[int], axis: int, factors: Sequence[float]) -> tuple[int, int, int]:
    """Shape after the two in-plane axes of ``axis`` get finer by ``factors`` (old / new spacing)."""
    out = [int(n) for n in shape]
    for ax, f in zip(in_plane_axes(axis), factors):
        out[ax] = _scaled_size(out[ax], f)
    return out[0], out[1], out[2]


def resampled_affine(affine: np.ndarray, axis: int, factors: Sequence[float]) -> np.ndarray:
    """Affine of the finer in-plane grid: new voxel ``j`` sits at old index ``(j + 0.5) / f - 0.5``.

    Voxel edges stay aligned (old and new grids share the edge at index -0.5), so each output voxel
    centre maps to the world position of the point it was interpolated at.
    """
    index_map = np.eye(4)
    for ax, f in zip(in_plane_axes(axis), factors):
        index_map[ax, ax] = 1.0 / float(f)
        index_map[ax, 3] = 0.5 / float(f) - 0.5
    return np.asarray(affine, dtype=np.float64) @ index_map


class VolumeWriter:
    """Write a NIfTI volume slice by slice, atomically, in memory independent of its size.

    Slices go into a hidden uncompressed temp file in the destination directory through a
    ``np.memmap`` (Fortran order, at ``vox_offset``). On :meth:`close` (leaving the ``with`` block),
    a ``.nii.gz`` target is stream-compressed into a second temp file; the finished file is then
    ``os.replace``-d into place. :meth:`finish` does the first half alone, so that several outputs can be
    finished and then renamed together (:func:`~microsr_tf.files.replace_together`). An exception inside
    the ``with``, :meth:`abort`, or slices left unwritten remove the temp files and leave nothing at
    ``path``. qform/sform codes and xyzt units are copied from a template ``header`` when given;
    ``description`` (at most 80 ASCII characters) goes into the header's ``descrip`` field.
    """

    def __init__(self, path: str | os.PathLike, shape: Sequence[int], affine: np.ndarray, axis: int = -1,
                 header: Nifti1Header | None = None, dtype: np.dtype | type = np.float32, description: str = ""):
        self.path = Path(path)
        self._ready: str | None = None  # the finished temporary, once :meth:`finish` has made it
        if not is_nifti_name(self.path):
            raise InputError(self.path, "output name must end in .nii or .nii.gz")
        if not self.path.parent.is_dir():
            raise InputError(self.path, "output directory does not exist")
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive sizes, got {tuple(shape)}")
        self.axis = _normalize_axis(axis)
        hdr = _output_header(self.shape, np.asarray(affine, dtype=np.float64), np.dtype(dtype), header)
        if len(description.encode("ascii")) > 80:
            raise ValueError(f"description must be at most 80 characters, got {len(description)}")
        hdr["descrip"] = description.encode("ascii")
        fd, tmp = temp_file_beside(self.path, ".part")
        self._temps = [tmp]
        self._cleanup = weakref.finalize(self, lambda temps: remove_quietly(*temps), self._temps)
        try:
            with os.fdopen(fd, "wb") as fh:
                hdr.write_to(fh)
                fh.flush()
                size = int(hdr.get_data_offset()) + int(np.prod(self.shape)) * hdr.get_data_dtype().itemsize
                # Reserve the blocks now: a full disk is one clear error before any work, not a failed
                # write (or a SIGBUS through the memmap) halfway through the volume. A file system that
                # cannot reserve gets a sparse file, as before.
                try:
                    os.posix_fallocate(fh.fileno(), 0, size)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise
                    fh.truncate(size)
            self._dtype = hdr.get_data_dtype()
            self._offset = int(hdr.get_data_offset())
            if self.axis == 2:
                # Last-axis slices are contiguous in Fortran order: write them with pwrite, so finished
                # slices live only in the page cache and resident memory stays flat however many are written.
                self._fh = open(tmp, "r+b")
                self._data = None
            else:
                self._fh = None
                self._data = np.memmap(tmp, dtype=self._dtype, mode="r+", offset=self._offset,
                                       shape=self.shape, order="F")
        except OSError as exc:
            self.abort()
            raise self._write_error(exc) from None
        except BaseException:
            self.abort()
            raise
        self._open = True
        self._written = np.zeros(self.shape[self.axis], dtype=bool)
        self._slice_shape = tuple(n for i, n in enumerate(self.shape) if i != self.axis)

    def __enter__(self) -> "VolumeWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write_slice(self, k: int, arr: np.ndarray) -> None:
        """Store 2-D ``arr`` as slice ``k`` along the writer's axis."""
        if not self._open:
            raise ValueError(f"{self.path}: writer is closed")
        arr = np.asarray(arr)
        if arr.shape != self._slice_shape:
            raise ValueError(f"{self.path}: slice {k} has shape {arr.shape}, expected {self._slice_shape}")
        if not 0 <= int(k) < self.shape[self.axis]:
            raise IndexError(f"{self.path}: slice {k} out of range [0, {self.shape[self.axis]})")
        try:
            if self._fh is not None:
                raw = np.asarray(arr, dtype=self._dtype).tobytes(order="F")
                os.pwrite(self._fh.fileno(), raw, self._offset + int(k) * len(raw))
            else:
                index = [slice(None)] * 3
                index[self.axis] = int(k)
                self._data[tuple(index)] = arr
        except OSError as exc:
            self.abort()
            raise self._write_error(exc) from None
        self._written[int(k)] = True

    def finish(self) -> str:
        """Check every slice was written and compress a ``.nii.gz``; return the finished temporary beside
        the target, still to be renamed onto it (by :meth:`close` or together with other outputs)."""
        if not self._open:
            if self._ready is None:
                raise ValueError(f"{self.path}: writer was aborted")
            return self._ready
        missing = int((~self._written).sum())
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: {missing} of {self._written.size} slices were never written")
        try:
            self._release()
            final = self._temps[0]
            if self.path.name.lower().endswith(".gz"):
                final = _gzip_to_temp(self._temps[0], self.path)
                self._temps.append(final)
        except OSError as exc:
            self.abort()
            raise self._write_error(exc) from None
        except BaseException:
            self.abort()
            raise
        self._ready = final
        return final

    def _write_error(self, exc: OSError) -> InputError:
        """A failed write (full disk, file-size limit, I/O error) named by the output it was for."""
        return InputError(self.path, f"cannot write the output ({exc.strerror or _first_line(exc)}); "
                                     "nothing was left in its place")

    def close(self) -> None:
        """Finish and rename into place; nothing more if the finished file was already renamed."""
        if not self._open and self._ready is None:
            return  # aborted
        final = self.finish()
        try:
            if os.path.exists(final):
                os.replace(final, self.path)
        except BaseException:
            self.abort()
            raise
        self._cleanup()

    def abort(self) -> None:
        """Discard everything written; nothing appears at the final path."""
        self._ready = None
        self._release()
        self._cleanup()

    def _release(self) -> None:
        """Flush and drop the handles on the temp file."""
        self._open = False
        if getattr(self, "_data", None) is not None:
            self._data.flush()
            self._data = None
        if getattr(self, "_fh", None) is not None:
            self._fh.close()
            self._fh = None


def _gzip_to_temp(src: str, target: Path) -> str:
    """Stream-compress ``src`` into a hidden temp file next to ``target``; return its path."""
    fd, tmp = temp_file_beside(target, ".gz.part")
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as fout:
            shutil.copyfileobj(fin, fout, _GZIP_CHUNK)
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp


def _output_header(shape: tuple[int, int, int], affine: np.ndarray, dtype: np.dtype,
                   template: Nifti1Header | None) -> Nifti1Header:
    """A fresh header for ``shape``/``affine``/``dtype`` keeping the template's qform/sform codes and units.

    ``affine`` is the output grid in the template's best (sform) space; a template whose qform differs
    from its sform keeps that difference: the output's qform is the template's qform moved by the same
    change of voxel grid.
    """
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    big = max(shape) > _NIFTI1_MAX_DIM
    hdr = Nifti2Header() if big or isinstance(template, Nifti2Header) else Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_data_offset(hdr.single_vox_offset)
    qcode, scode = 0, 2
    units = ("mm", "unknown")
    if template is not None:
        qcode, scode = int(template["qform_code"]), int(template["sform_code"])
        units = template.get_xyzt_units()
        if qcode == 0 and scode == 0 and not _is_base_affine(affine, shape):
            # the source declares no orientation (readers place it by pixdim alone, each by its own rule);
            # an output of the same extent stays so, a sub-grid (--roi) needs its place kept in nibabel's frame
            scode = 2
    qform = affine
    if template is not None and qcode > 0 and scode > 0:
        # ``affine`` was made from the template's best affine (its sform); a qform that places the volume
        # elsewhere (scanner vs template space) gets the same voxel-grid change, not the sform's transform.
        source_q, source_best = template.get_qform(), template.get_best_affine()
        if not np.allclose(source_q, source_best, rtol=1e-5, atol=1e-4):
            qform = source_q @ np.linalg.solve(source_best, affine)
    hdr.set_qform(qform, code=qcode)
    hdr.set_sform(affine, code=scode)
    hdr.set_zooms(tuple(np.linalg.norm(affine[:3, :3], axis=0)))
    hdr.set_xyzt_units(*units)
    return hdr


def _is_base_affine(affine: np.ndarray, shape: tuple[int, int, int]) -> bool:
    """Whether ``affine`` is the one nibabel gives a ``shape`` grid without qform or sform (x flipped, centred)."""
    hdr = Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_zooms(tuple(np.linalg.norm(affine[:3, :3], axis=0)))
    return bool(np.allclose(hdr.get_base_affine(), affine, rtol=1e-6, atol=1e-5))


def write_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray,
                 header: Nifti1Header | None = None, dtype: np.dtype | type = np.float32) -> None:
    """Write a whole 3-D array atomically (through :class:`VolumeWriter`)."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"write_volume needs a 3-D array, got shape {array.shape}")
    with VolumeWriter(path, array.shape, affine, axis=-1, header=header, dtype=dtype) as writer:
        for k in range(array.shape[2]):
            writer.write_slice(k, array[:, :, k])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
