"""Test helper: write a known volume as a DICOM series with pydicom, one file per slice or one
multi-frame file.

The geometry follows DICOM PS3.3 C.7.6.2.1.1 written out directly from a NIfTI (RAS) affine:
ImageOrientationPatient holds the LPS directions of array axes 0 (along a row) and 1 (down a
column), PixelSpacing their lengths as (row spacing, column spacing), and ImagePositionPatient of file
``k`` the LPS position of voxel ``(0, 0, k)``. Pixel ``[row r, column c]`` of file ``k`` is voxel
``(c, r, k)``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ds_values(values) -> list[DSfloat]:
    """Decimal strings of at most 16 characters, as the standard allows."""
    return [DSfloat(float(v), auto_format=True) for v in values]


def geometry(affine_ras: np.ndarray, k: int) -> dict:
    """ImageOrientationPatient, ImagePositionPatient, PixelSpacing and SliceThickness of slice ``k``."""
    lps = RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)
    d_c, d_r = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    return {"iop": np.concatenate([lps[:3, 0] / d_c, lps[:3, 1] / d_r]), "ipp": lps[:3, 3] + k * lps[:3, 2],
            "pixel_spacing": (d_r, d_c), "thickness": float(np.linalg.norm(lps[:3, 2]))}


def slice_dataset(stored: np.ndarray, iop, ipp, pixel_spacing, series_uid: str, study_uid: str,
                  slope: float = 1.0, intercept: float = 0.0, instance: int = 1,
                  thickness: float | None = None) -> Dataset:
    """One CT image slice; ``stored`` is the slice as stored integers in array layout ``(columns, rows)``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.InstanceNumber = instance
    pixels = np.ascontiguousarray(np.asarray(stored).T)  # [row, column]
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = ds_values(pixel_spacing)
    ds.ImageOrientationPatient = ds_values(iop)
    ds.ImagePositionPatient = ds_values(ipp)
    if thickness is not None:
        ds.SliceThickness = DSfloat(float(thickness), auto_format=True)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.RescaleSlope = DSfloat(slope, auto_format=True)
    ds.RescaleIntercept = DSfloat(intercept, auto_format=True)
    ds.PixelData = pixels.astype("<i2" if pixels.dtype.kind == "i" else "<u2").tobytes()
    return ds


def write_series(folder, stored: np.ndarray, affine_ras: np.ndarray, slope: float = 1.0, intercept: float = 0.0,
                 seed: int = 0, series_uid: str | None = None, compress: str | None = None) -> list[Path]:
    """Write ``stored`` (int16/uint16, array layout ``(columns, rows, slices)``) as one series in ``folder``.

    Files get random names and are written in a shuffled order with shuffled InstanceNumbers, so a
    reader can only order them by their positions. Returns the paths in slice order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    rng = np.random.default_rng(seed)
    n = stored.shape[2]
    instances = rng.permutation(n) + 1
    paths = [folder / f"{uuid.UUID(int=int(rng.integers(2**63)) << 64 | k).hex}.dcm" for k in range(n)]
    for k in rng.permutation(n):
        ds = slice_dataset(stored[:, :, k], **geometry(affine_ras, int(k)), series_uid=series_uid,
                           study_uid=study_uid, slope=slope, intercept=intercept, instance=int(instances[k]))
        if compress is not None:
            ds.compress(compress)
        ds.save_as(paths[k], enforce_file_format=True)
    return paths


def rotation(axis, angle: float) -> np.ndarray:
    """Rotation by ``angle`` radians about the unit vector along ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def affine_from(rotation_matrix: np.ndarray, zooms, origin) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(rotation_matrix) @ np.diag(zooms)
    aff[:3, 3] = origin
    return aff


def multiframe_dataset(stored: np.ndarray, affine_ras: np.ndarray, order=None, slopes=None, intercepts=None,
                       enhanced: bool = True) -> Dataset:
    """``stored`` (int16/uint16, ``(columns, rows, slices)``) as one multi-frame file; frame ``f`` holds
    slice ``order[f]`` with rescale ``slopes[f]``, ``intercepts[f]``. Enhanced: Enhanced CT with the
    geometry and rescale in functional groups (spacing and orientation shared, position and rescale per
    frame). Legacy: top-level geometry of slice 0 and SpacingBetweenSlices, one rescale for all frames."""
    n = stored.shape[2]
    order = list(range(n)) if order is None else list(order)
    slopes = [1.0] * n if slopes is None else list(slopes)
    intercepts = [0.0] * n if intercepts is None else list(intercepts)
    first = geometry(affine_ras, 0)
    ds = slice_dataset(stored[:, :, 0], **first, series_uid=generate_uid(), study_uid=generate_uid(),
                       slope=slopes[0], intercept=intercepts[0])
    frames = np.stack([np.asarray(stored[:, :, k]).T for k in order])  # [frame, row, column]
    ds.NumberOfFrames = n
    ds.PixelData = frames.astype("<i2" if frames.dtype.kind == "i" else "<u2").tobytes()
    if not enhanced:
        ds.SpacingBetweenSlices = DSfloat(first["thickness"], auto_format=True)
        return ds
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    for keyword in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "RescaleSlope",
                    "RescaleIntercept"):
        delattr(ds, keyword)
    measures, plane, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = ds_values(first["pixel_spacing"])
    measures.SliceThickness = DSfloat(first["thickness"], auto_format=True)
    plane.ImageOrientationPatient = ds_values(first["iop"])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for f, k in enumerate(order):
        position, rescale, group = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = ds_values(geometry(affine_ras, k)["ipp"])
        rescale.RescaleSlope = DSfloat(slopes[f], auto_format=True)
        rescale.RescaleIntercept = DSfloat(intercepts[f], auto_format=True)
        rescale.RescaleType = "HU"
        group.PlanePositionSequence = Sequence([position])
        group.PixelValueTransformationSequence = Sequence([rescale])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds
