"""DICOM series in: geometry and values against the NIfTI route and nibabel's DICOM wrapper, refusals,
lazy reads, training folders of series, and predict on a series against predict on its NIfTI twin."""

from __future__ import annotations

import csv
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import JPEGLosslessSV1, RLELossless, generate_uid

from microsr_tf.cli.main import cli
from microsr_tf.config import DataConfig
from microsr_tf.demo import BUNDLED_MODEL
from microsr_tf.dicom import DicomSeries
from microsr_tf.errors import InputError
from microsr_tf.pipeline import make_training_data
from microsr_tf.volumes import find_volumes, open_volume

with warnings.catch_warnings():  # nibabel warns that its DICOM readers are experimental; the wrapper is used
    warnings.simplefilter("ignore")  # here only as a second formulation of single-slice geometry and scaling
    from nibabel.nicom.dicomwrappers import wrapper_from_file

from dicomseries import (affine_from, geometry, multiframe_dataset, rotation, slice_dataset,  # tests/dicomseries.py
                         write_series)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = BUNDLED_MODEL  # the demo's model, in saved_models/

AXIAL = affine_from(np.eye(3), (0.4, 0.5, 1.2), (10.0, -20.0, 5.0))
OBLIQUE = affine_from(rotation((1.0, 2.0, 0.5), 0.7), (0.4, 0.5, 1.2), (-31.5, 12.25, 40.0))
# A left-handed grid: slices stored against the DICOM slice normal, so the series comes out in reverse.
OBLIQUE_FLIPPED = affine_from(rotation((0.3, -1.0, 2.0), 2.1) @ np.diag([1.0, 1.0, -1.0]), (0.45, 0.35, 0.9),
                              (7.0, 3.0, -12.0))


def stored_volume(shape=(12, 10, 7), seed=0, dtype=np.int16) -> np.ndarray:
    """Stored integers with structure on every axis (so a transposed or flipped read cannot pass)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    base = 200 * i + 37 * j + 1000 * k + rng.integers(0, 30, shape)
    return (base - (500 if np.dtype(dtype).kind == "i" else 0)).astype(dtype)


def write_twin(path, values: np.ndarray, affine: np.ndarray) -> Path:
    """The NIfTI route: the same voxel values (float32) written by nibabel with the same affine."""
    nib.save(nib.Nifti1Image(values.astype(np.float32), affine), path)
    return path


def world(affine, ijk):
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def all_voxels(shape):
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3).astype(float)


def read_all(vol, axis):
    """The whole volume assembled from slices read along ``axis``."""
    out = np.empty(vol.shape, np.float32)
    for k, arr in vol.iter_slices(axis):
        index = [slice(None)] * 3
        index[axis] = k
        out[tuple(index)] = arr
    return out


def assert_same_voxels_in_world(series, twin):
    """Every voxel of ``series`` lies exactly on a voxel centre of ``twin`` and holds its value."""
    ijk = all_voxels(series.shape)
    twin_ijk = world(np.linalg.inv(twin.affine), world(series.affine, ijk))
    rounded = np.round(twin_ijk)
    assert np.abs(twin_ijk - rounded).max() < 1e-4  # in voxels; the voxels are >= 0.35 mm
    assert np.abs(world(twin.affine, rounded) - world(series.affine, ijk)).max() < 1e-4  # mm
    idx = rounded.astype(int)
    assert ((idx >= 0) & (idx < np.array(twin.shape))).all()
    twin_data = read_all(twin, 2)
    for axis in (0, 1, 2):
        data = read_all(series, axis)
        np.testing.assert_array_equal(data[tuple(ijk.astype(int).T)], twin_data[tuple(idx.T)])


# ---------------------------------------------------------------------------------- geometry and values


def test_axial_series_geometry_and_rescale_by_hand(tmp_path):
    stored = stored_volume()
    folder = tmp_path / "s"
    folder.mkdir()
    uid, study = generate_uid(), generate_uid()
    for k in (4, 0, 6, 2, 1, 5, 3):  # file names and InstanceNumbers out of order
        slice_dataset(stored[:, :, k], iop=(1, 0, 0, 0, 1, 0), ipp=(-10.0, 20.0, 5.0 + 1.2 * k),
                      pixel_spacing=(0.5, 0.4), series_uid=uid, study_uid=study, slope=0.5, intercept=-1024.0,
                      instance=7 - k).save_as(folder / f"IM{(k * 3) % 7}", enforce_file_format=True)
    vol = open_volume(folder)
    assert isinstance(vol, DicomSeries)
    assert vol.shape == (12, 10, 7)
    assert vol.spacing == pytest.approx((0.4, 0.5, 1.2))
    assert vol.in_plane_spacing(-1) == pytest.approx((0.4, 0.5))
    # By hand: IOP (1,0,0, 0,1,0), IPP_k = (-10, 20, 5 + 1.2 k), PixelSpacing (0.5, 0.4) between (rows, columns):
    # voxel (i = column, j = row, k) is at LPS (-10 + 0.4 i, 20 + 0.5 j, 5 + 1.2 k),
    # which is RAS (10 - 0.4 i, -20 - 0.5 j, 5 + 1.2 k).
    hand = np.array([[-0.4, 0, 0, 10.0], [0, -0.5, 0, -20.0], [0, 0, 1.2, 5.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(vol.affine, hand, atol=1e-9)
    for k in range(7):
        np.testing.assert_array_equal(vol.read_slice(k), stored[:, :, k].astype(np.float64) * 0.5 - 1024.0)
    assert vol.header["qform_code"] == 1 and vol.header["sform_code"] == 1
    np.testing.assert_allclose(vol.header.get_best_affine(), hand, atol=1e-6)


@pytest.mark.parametrize("affine", [AXIAL, OBLIQUE, OBLIQUE_FLIPPED], ids=["axial", "oblique", "oblique_flipped"])
def test_series_matches_its_nifti_twin_voxel_for_voxel_in_world_space(tmp_path, affine):
    stored = stored_volume(dtype=np.uint16)
    slope, intercept = 0.25, -1024.0
    paths = write_series(tmp_path / "series", stored, affine, slope=slope, intercept=intercept, seed=3)
    twin = open_volume(write_twin(tmp_path / "twin.nii.gz", stored * slope + intercept, affine))
    series = open_volume(tmp_path / "series")
    assert_same_voxels_in_world(series, twin)
    np.testing.assert_allclose(series.spacing, twin.spacing, rtol=1e-6)  # NIfTI pixdim is float32
    flipped = affine is OBLIQUE_FLIPPED
    if flipped:  # read in reverse: series slice k is twin slice n - 1 - k
        n = stored.shape[2]
        np.testing.assert_allclose(series.affine, affine @ np.array(
            [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, n - 1], [0, 0, 0, 1]], float), atol=1e-6)
    else:
        np.testing.assert_allclose(series.affine, affine, atol=1e-6)
    # A second formulation from a library: nibabel's DICOM wrapper gives each file's voxel -> LPS map
    # over (row, column) and its rescaled pixels.
    order = paths[::-1] if flipped else paths
    for k, path in enumerate(order):
        wrapper = wrapper_from_file(path)
        lps_of_voxel = wrapper.affine[:3, :3] @ np.array([[0, 1], [1, 0], [0, 0]], float)  # (i=col, j=row)
        ras = np.diag([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(series.affine[:3, :2], ras @ lps_of_voxel, atol=1e-9)
        np.testing.assert_allclose(world(series.affine, np.array([0.0, 0.0, k])), ras @ wrapper.affine[:3, 3],
                                   atol=1e-9)
        np.testing.assert_allclose(series.read_slice(k), wrapper.get_data().T, rtol=0, atol=1e-9)


def test_rle_compressed_series_reads_as_the_uncompressed_one(tmp_path):
    stored = stored_volume()
    write_series(tmp_path / "plain", stored, OBLIQUE, slope=2.0, intercept=-10.0)
    write_series(tmp_path / "rle", stored, OBLIQUE, slope=2.0, intercept=-10.0, compress=RLELossless)
    plain, rle = open_volume(tmp_path / "plain"), open_volume(tmp_path / "rle")
    np.testing.assert_array_equal(read_all(rle, 2), read_all(plain, 2))
    np.testing.assert_array_equal(rle.affine, plain.affine)


@pytest.mark.parametrize("affine", [AXIAL, OBLIQUE, OBLIQUE_FLIPPED], ids=["axial", "oblique", "oblique_flipped"])
def test_enhanced_multiframe_file_reads_as_its_one_file_per_slice_twin(tmp_path, affine):
    """Frames stored out of slice order, each with its own rescale: placed by their functional groups,
    they give the grid of the same volume written one file per slice (itself checked against NIfTI)."""
    stored = stored_volume(dtype=np.uint16)
    n = stored.shape[2]
    rng = np.random.default_rng(5)
    order = rng.permutation(n)  # frame f holds slice order[f]
    slopes, intercepts = rng.choice([0.25, 0.5, 2.0], n), rng.choice([-1024.0, -1000.0, 0.0], n)
    (tmp_path / "mf").mkdir()
    multiframe_dataset(stored, affine, order, slopes, intercepts).save_as(tmp_path / "mf" / "ct.dcm",
                                                                          enforce_file_format=True)
    write_series(tmp_path / "files", stored, affine)
    frames, files = open_volume(tmp_path / "mf"), open_volume(tmp_path / "files")
    assert frames.shape == files.shape == stored.shape
    np.testing.assert_allclose(frames.affine, files.affine, rtol=0, atol=1e-9)
    np.testing.assert_allclose(frames.spacing, files.spacing, rtol=1e-12)
    frame_of = np.argsort(order)  # the frame holding slice k
    expected = (stored * slopes[frame_of] + intercepts[frame_of]).astype(np.float32)  # by hand, slice by slice
    if affine is OBLIQUE_FLIPPED:  # stored against the slice normal: read in reverse, as the files are
        expected = expected[:, :, ::-1]
    for axis in (0, 1, 2):
        np.testing.assert_array_equal(read_all(frames, axis), expected)


@pytest.mark.parametrize("affine", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
def test_legacy_multiframe_file_steps_its_frames_along_the_normal(tmp_path, affine):
    stored = stored_volume()
    (tmp_path / "mf").mkdir()
    multiframe_dataset(stored, affine, slopes=[0.5] * 7, intercepts=[-1024.0] * 7, enhanced=False).save_as(
        tmp_path / "mf" / "ct.dcm", enforce_file_format=True)
    write_series(tmp_path / "files", stored, affine, slope=0.5, intercept=-1024.0)
    frames, files = open_volume(tmp_path / "mf"), open_volume(tmp_path / "files")
    np.testing.assert_allclose(frames.affine, files.affine, rtol=0, atol=1e-6)  # steps from a 16-character gap
    np.testing.assert_array_equal(read_all(frames, 2), read_all(files, 2))


def test_rle_multiframe_decodes_one_frame_per_slice_as_the_uncompressed_file(tmp_path):
    stored = stored_volume()
    for name, compress in (("plain", None), ("rle", RLELossless)):
        (tmp_path / name).mkdir()
        ds = multiframe_dataset(stored, OBLIQUE, order=[3, 0, 6, 1, 5, 2, 4], slopes=[2.0] * 7, intercepts=[-10.0] * 7)
        if compress:
            ds.compress(compress)
        ds.save_as(tmp_path / name / "ct.dcm", enforce_file_format=True)
    plain, rle = open_volume(tmp_path / "plain"), open_volume(tmp_path / "rle")
    np.testing.assert_array_equal(read_all(rle, 2), read_all(plain, 2))
    np.testing.assert_array_equal(read_all(plain, 2), stored * 2.0 - 10.0)


def test_per_file_rescale_is_applied_file_by_file(tmp_path):
    stored = stored_volume(shape=(6, 5, 3))
    folder = tmp_path / "s"
    folder.mkdir()
    uid, study = generate_uid(), generate_uid()
    slopes = (1.0, 0.5, 3.0)
    for k in range(3):
        slice_dataset(stored[:, :, k], **geometry(AXIAL, k), series_uid=uid, study_uid=study, slope=slopes[k],
                      intercept=-k * 100.0).save_as(folder / f"{k}.dcm", enforce_file_format=True)
    vol = open_volume(folder)
    for k in range(3):
        np.testing.assert_array_equal(vol.read_slice(k), stored[:, :, k] * slopes[k] - k * 100.0)


# ---------------------------------------------------------------------------------- refusals


def one_line_naming(exc, path) -> str:
    text = str(exc.value)
    assert "\n" not in text
    assert str(path) in text
    return text


def _series(folder, shape=(8, 6, 5), affine=AXIAL, **kw):
    return write_series(folder, stored_volume(shape), affine, **kw)


def _refusal_case(case: str, folder: Path):
    """Build a bad series folder; return (path expected in the message, words expected in it)."""
    folder.mkdir()
    if case == "empty":
        return folder, ["empty"]
    if case == "two_series":
        _series(folder)
        _series(folder, seed=1)
        return folder, ["2 DICOM series", "own folder"]
    if case == "missing_slice":
        paths = _series(folder)
        paths[2].unlink()
        return folder, ["1 slice(s) missing", "1.2 mm"]
    if case == "uneven":
        uid, study = generate_uid(), generate_uid()
        for k, z in enumerate([0.0, 1.2, 2.4, 3.1, 4.8]):
            slice_dataset(stored_volume((8, 6, 5))[:, :, k], iop=(1, 0, 0, 0, 1, 0), ipp=(0, 0, z),
                          pixel_spacing=(0.5, 0.5), series_uid=uid, study_uid=study).save_as(
                folder / f"f{k}.dcm", enforce_file_format=True)
        return folder, ["unevenly spaced", "0.7 mm apart"]
    if case == "duplicate_position":
        paths = _series(folder)
        ds = pydicom.dcmread(paths[1])
        ds.ImagePositionPatient = pydicom.dcmread(paths[2]).ImagePositionPatient
        ds.save_as(paths[1])
        return folder, ["same slice position"]
    if case == "not_dicom":
        _series(folder)
        (folder / "notes.txt").write_text("scanned on Tuesday")
        return folder / "notes.txt", ["not a DICOM file"]
    if case == "nifti_inside":
        _series(folder)
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), folder / "mask.nii.gz")
        return folder / "mask.nii.gz", ["not a DICOM file"]
    if case == "no_image":
        paths = _series(folder)
        ds = pydicom.dcmread(paths[0])
        del ds.PixelData
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
        ds.save_as(folder / "report.dcm")
        return folder / "report.dcm", ["holds no image", "Basic Text SR"]
    if case == "multiframe_beside_files":
        paths = _series(folder, shape=(8, 6, 2))
        ds = pydicom.dcmread(paths[0])
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2
        ds.save_as(paths[0])
        return paths[0], ["multi-frame", "2 frames", "beside 1 other file", "one multi-frame file or one file per"]
    if case == "legacy_multiframe_without_spacing":
        folder.mkdir(parents=True, exist_ok=True)
        ds = multiframe_dataset(stored_volume((8, 6, 3)), AXIAL, enhanced=False)
        del ds.SpacingBetweenSlices
        ds.save_as(folder / "ct.dcm", enforce_file_format=True)
        return folder / "ct.dcm", ["3 frames", "SpacingBetweenSlices", "cannot be placed"]
    if case == "frame_without_position":
        folder.mkdir(parents=True, exist_ok=True)
        ds = multiframe_dataset(stored_volume((8, 6, 3)), AXIAL)
        del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
        ds.save_as(folder / "ct.dcm", enforce_file_format=True)
        return folder / "ct.dcm", ["frame 2: lacks PlanePositionSequence"]
    if case == "frame_off_the_line":
        folder.mkdir(parents=True, exist_ok=True)
        ds = multiframe_dataset(stored_volume((8, 6, 4)), AXIAL)
        ipp = [float(v) for v in ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0].ImagePositionPatient]
        ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0].ImagePositionPatient = [ipp[0] + 3.0, *ipp[1:]]
        ds.save_as(folder / "ct.dcm", enforce_file_format=True)
        return folder / "ct.dcm", ["frame 3: ImagePositionPatient", "off the line"]
    if case == "colour":
        paths = _series(folder, shape=(8, 6, 2))
        ds = pydicom.dcmread(paths[1])
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.save_as(paths[1])
        return paths[1], ["3 samples per pixel"]
    if case == "size_mismatch":
        paths = _series(folder)
        first = pydicom.dcmread(paths[0])
        slice_dataset(stored_volume((8, 7, 1))[:, :, 0], **geometry(AXIAL, 5), series_uid=first.SeriesInstanceUID,
                      study_uid=first.StudyInstanceUID).save_as(folder / "odd.dcm", enforce_file_format=True)
        return folder / "odd.dcm", ["7 x 8", "one size"]
    if case == "localizer":
        paths = _series(folder)
        ds = pydicom.dcmread(paths[3])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal scout
        ds.save_as(paths[3])
        return paths[3], ["ImageOrientationPatient", "localizer"]
    if case == "no_position":
        paths = _series(folder)
        ds = pydicom.dcmread(paths[2])
        del ds.ImagePositionPatient
        ds.save_as(paths[2])
        return paths[2], ["lacks ImagePositionPatient"]
    if case == "subfolder":
        _series(folder)
        (folder / "old").mkdir()
        return folder, ["subfolder 'old'"]
    if case == "single_slice_no_thickness":
        paths = _series(folder, shape=(8, 6, 1))
        ds = pydicom.dcmread(paths[0])
        del ds.SliceThickness
        ds.save_as(paths[0])
        return paths[0], ["single slice", "spacing is unknown"]
    if case == "jpeg_lossless_without_decoder":
        paths = _series(folder, shape=(8, 6, 2))
        for path in paths:  # the transfer syntax is refused before any pixel is decoded
            ds = pydicom.dcmread(path)
            ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
            ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xd9"])
            ds["PixelData"].VR = "OB"
            ds.save_as(path)
        return min(paths), ["JPEG Lossless", "pip install pylibjpeg pylibjpeg-libjpeg", "python-gdcm"]
    raise AssertionError(case)


REFUSALS = ["empty", "two_series", "missing_slice", "uneven", "duplicate_position", "not_dicom", "nifti_inside",
            "no_image", "multiframe_beside_files", "legacy_multiframe_without_spacing", "frame_without_position",
            "frame_off_the_line", "colour", "size_mismatch", "localizer", "no_position", "subfolder",
            "single_slice_no_thickness", "jpeg_lossless_without_decoder"]


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_series_is_refused_in_one_line_naming_the_folder_or_file(tmp_path, case):
    if case == "jpeg_lossless_without_decoder" and pydicom.pixels.get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    where, words = _refusal_case(case, tmp_path / "series")
    with pytest.raises(InputError) as exc:
        open_volume(tmp_path / "series")
    text = one_line_naming(exc, where)
    for word in words:
        assert word in text, text


def test_outputs_are_named_after_the_series_folder(tmp_path, monkeypatch):
    from microsr_tf.inference.predict import plan_volume

    write_series(tmp_path / "ear01", stored_volume((8, 6, 3)), AXIAL)
    meta = {"hr_spacing": [0.1, 0.125], "factors": [4.0, 4.0], "hr_stats": {}}
    assert plan_volume(f"{tmp_path / 'ear01'}/", meta).name == "ear01"
    monkeypatch.chdir(tmp_path / "ear01")
    assert plan_volume(".", meta).name == "ear01"


def test_cli_refuses_a_bad_series_in_one_line_and_writes_nothing(tmp_path):
    _refusal_case("missing_slice", tmp_path / "series")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "series"), "--model", str(BUNDLED), "--out-dir",
                                      str(out), "-T", "2"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and str(tmp_path / "series") in lines[0], result.output
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------- lazy reads


def test_pixels_are_read_lazily_one_file_at_a_time(tmp_path):
    stored = stored_volume((96, 80, 120))
    paths = write_series(tmp_path / "s", stored, OBLIQUE)
    damaged = paths[17]
    damaged.write_bytes(damaged.read_bytes()[:-2000])  # pixel data cut short
    vol = open_volume(tmp_path / "s")  # headers only: the damage is not seen yet
    assert vol.read_slice(3).shape == (96, 80)
    with pytest.raises(InputError) as exc:
        vol.read_slice(17)
    one_line_naming(exc, damaged)

    damaged.unlink()
    write_series(tmp_path / "t", stored, OBLIQUE)
    vol = open_volume(tmp_path / "t")
    one, full = 96 * 80 * 4, stored.size * 4  # a float32 slice and the float32 volume
    tracemalloc.start()
    try:
        for _ in vol.iter_slices(-1):
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * one and peak < full / 10, (peak, one, full)  # a few slices' worth, not the volume

    (tmp_path / "mf").mkdir()  # one multi-frame file: each slice decodes its own frame, not the file
    multiframe_dataset(stored, OBLIQUE).save_as(tmp_path / "mf" / "ct.dcm", enforce_file_format=True)
    vol = open_volume(tmp_path / "mf")
    tracemalloc.start()
    try:
        for k, arr in vol.iter_slices(-1):
            assert arr.shape == (96, 80)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * one and peak < full / 10, (peak, one, full)


# ---------------------------------------------------------------------------------- training folders


def test_training_folders_take_one_subfolder_per_series(tmp_path):
    """LR volumes as DICOM series subfolders give exactly the patches of their NIfTI twins."""
    rng = np.random.default_rng(5)
    lr_nifti, lr_dicom, hr = tmp_path / "lr_nii", tmp_path / "lr_dcm", tmp_path / "hr"
    for d in (lr_nifti, lr_dicom, hr):
        d.mkdir()
    lr_affine = affine_from(np.eye(3), (0.4, 0.4, 0.4), (0.0, 0.0, 0.0))
    for s in range(2):
        grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in (16, 16, 4)], indexing="ij")
        blob = ((grid[0] ** 2 + grid[1] ** 2) < 0.5 + 0.1 * s)
        stored = (100 + 1500 * blob + rng.integers(0, 50, blob.shape)).astype(np.int16)
        write_series(lr_dicom / f"sub-{s}", stored, lr_affine, slope=1.0, intercept=-1024.0, seed=s)
        write_twin(lr_nifti / f"sub-{s}.nii.gz", stored - 1024.0, lr_affine)
        hr_grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in (64, 64, 4)], indexing="ij")
        hr_blob = (hr_grid[0] ** 2 + hr_grid[1] ** 2) < 0.45 + 0.1 * s
        nib.save(nib.Nifti1Image((1000 + 20000 * hr_blob + rng.integers(0, 500, hr_blob.shape)).astype(np.uint16),
                                 affine_from(np.eye(3), (0.1, 0.1, 0.4), (0, 0, 0))), hr / f"hr-{s}.nii.gz")
    (lr_dicom / "README.txt").write_text("files other than volumes are ignored")
    assert [p.name for p in find_volumes(lr_dicom)] == ["sub-0", "sub-1"]

    cfg = DataConfig(patch_size=32, stride=16, seed=0)
    a = make_training_data(lr_nifti, hr, cfg, n_val=4)
    b = make_training_data(lr_dicom, hr, cfg, n_val=4)
    assert a.n_lr_patches == b.n_lr_patches > 0
    assert a.lr_spacing == pytest.approx(b.lr_spacing)
    np.testing.assert_allclose(b.val_lr, a.val_lr, atol=1e-6)
    lr_a, _ = next(iter(a.dataset(4)))
    lr_b, _ = next(iter(b.dataset(4)))
    np.testing.assert_allclose(lr_b.numpy(), lr_a.numpy(), atol=1e-6)


def test_a_training_folder_of_loose_dicom_files_says_how_to_lay_them_out(tmp_path):
    write_series(tmp_path / "lr", stored_volume((8, 6, 3)), AXIAL)
    with pytest.raises(InputError) as exc:
        find_volumes(tmp_path / "lr")
    assert "own subfolder" in one_line_naming(exc, tmp_path / "lr")
    # A multi-frame file is a whole volume: such files may lie directly in the folder.
    mf = tmp_path / "mf"
    mf.mkdir()
    for name, seed in (("ear02.dcm", 1), ("ear01.dcm", 0)):
        multiframe_dataset(stored_volume((8, 6, 3), seed=seed), AXIAL).save_as(mf / name, enforce_file_format=True)
    (mf / "notes.txt").write_text("not a volume")
    assert find_volumes(mf) == [mf / "ear01.dcm", mf / "ear02.dcm"]
    np.testing.assert_array_equal(read_all(open_volume(mf / "ear02.dcm"), 2), stored_volume((8, 6, 3), seed=1))


# ---------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory):
    """A phantom cone-beam CT (the bundled model's LR grid) as NIfTI and as a DICOM series (uint16 + intercept)."""
    from microsr_tf.phantoms import affine as phantom_affine
    from microsr_tf.phantoms import generate_subject, get_spec, render_lr

    root = tmp_path_factory.mktemp("phantom")
    spec = get_spec("small")
    hu = render_lr(generate_subject(np.random.default_rng([7, 0]), spec), spec, np.random.default_rng(1))
    hu = np.round(hu).astype(np.int16)
    # An oblique placement of the phantom's grid, so the series' IOP is not the identity. The spacing,
    # 0.46875 mm (within the model's 5% of 0.48), is exact both as a NIfTI float32 pixdim and as a DICOM
    # decimal string, so both routes give the model the very same numbers and the outputs can be
    # compared bit for bit. (0.48 is neither: 0.4799999893 in float32, and a decimal string holds at
    # most 16 characters, so the two routes would differ at float32 rounding, ~1e-6 relative.)
    zooms = (0.46875, 0.46875, 0.0625)
    affine = affine_from(rotation((0.2, 0.3, 1.0), 0.6), zooms, phantom_affine(hu.shape, zooms)[:3, 3])
    twin = write_twin(root / "ear.nii.gz", hu.astype(np.float32), affine)
    stored = (hu.astype(np.int32) + 2048).astype(np.uint16)
    write_series(root / "ear", stored, affine, intercept=-2048.0, seed=11)
    (root / "ear_mf").mkdir()  # the same scan as one Enhanced CT file, frames in reverse
    n = stored.shape[2]
    multiframe_dataset(stored, affine, order=range(n - 1, -1, -1), intercepts=[-2048.0] * n).save_as(
        root / "ear_mf" / "ct.dcm", enforce_file_format=True)
    return twin, root / "ear", hu


@pytest.mark.slow
def test_predict_on_a_series_or_a_multiframe_file_equals_predict_on_its_nifti_twin(tmp_path, phantom_pair):
    twin, series, _ = phantom_pair
    outs = {}
    for name, src in (("nifti", twin), ("dicom", series), ("multiframe", series.parent / "ear_mf"),
                      ("multiframe_file", series.parent / "ear_mf" / "ct.dcm")):
        out = tmp_path / name
        result = CliRunner().invoke(cli, ["predict", str(src), "--model", str(BUNDLED), "--out-dir", str(out),
                                          "-T", "2", "--seed", "5", "--roi", "4:20,6:18,20:23", "--tile", "64"])
        assert result.exit_code == 0, result.output
        outs[name] = out
    assert sorted(p.name for p in outs["dicom"].iterdir()) == ["ear_mean.nii.gz", "ear_var.nii.gz"]
    assert sorted(p.name for p in outs["multiframe"].iterdir()) == ["ear_mf_mean.nii.gz", "ear_mf_var.nii.gz"]
    assert sorted(p.name for p in outs["multiframe_file"].iterdir()) == ["ct_mean.nii.gz", "ct_var.nii.gz"]
    for key in ("mean", "var"):
        a = nib.load(outs["nifti"] / f"ear_{key}.nii.gz")
        for b in (nib.load(outs["dicom"] / f"ear_{key}.nii.gz"), nib.load(outs["multiframe"] / f"ear_mf_{key}.nii.gz"),
                  nib.load(outs["multiframe_file"] / f"ct_{key}.nii.gz")):
            assert a.shape == b.shape == (125, 94, 3)  # round(16 * 7.8125), round(12 * 7.8125)
            np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
            assert np.asarray(b.dataobj).std() > 0
            assert b.header["sform_code"] == 1  # scanner coordinates


@pytest.mark.slow
def test_evaluate_reads_series_for_the_lr_scan_and_the_hr_set(tmp_path, phantom_pair):
    """evaluate opens its volumes through open_volume: a series LR scan and an HR set of series
    subfolders give the same metrics as their NIfTI twins."""
    from microsr_tf.evaluation import evaluate_files
    from microsr_tf.export import load_model
    from microsr_tf.inference.predict import predict_volume

    _, _, hu = phantom_pair
    # Axis-aligned, with spacings and origin exact in float32 and in decimal strings, so both routes
    # state bit-identical grids (an oblique IOP cannot be: its NIfTI twin stores the affine in float32).
    affine = affine_from(np.eye(3), (0.46875, 0.46875, 0.0625), (-5.625, -5.625, -1.5))
    twin = write_twin(tmp_path / "ear.nii.gz", hu.astype(np.float32), affine)
    series = tmp_path / "ear"
    write_series(series, hu, affine, seed=2)
    gen, meta = load_model(BUNDLED)
    pred = tmp_path / "pred"
    res = predict_volume(twin, gen, meta, pred, samples=2, seed=0, roi=((None, None), (None, None), (20, 23)))
    mean = nib.load(res.outputs["mean"])
    hr = np.clip(np.round(np.asarray(mean.dataobj)), 0, 65535).astype(np.uint16)
    (tmp_path / "hr_nii").mkdir()
    write_twin(tmp_path / "hr_nii" / "hr-0.nii.gz", hr.astype(np.float32), mean.affine)
    write_series(tmp_path / "hr_dcm" / "hr-0", hr, mean.affine)
    reports = {}
    for route, lr, hr_dir in (("nifti", twin, tmp_path / "hr_nii"), ("dicom", series, tmp_path / "hr_dcm")):
        _, files = evaluate_files(lr, hr_dir, {"cyclegan": pred}, tmp_path / f"report_{route}")
        with open(files["metrics.csv"], newline="", encoding="utf-8") as fh:
            reports[route] = list(csv.DictReader(fh))
    assert [r["method"] for r in reports["dicom"]][:2] == ["bicubic", "cyclegan"]
    assert reports["dicom"] == reports["nifti"]
