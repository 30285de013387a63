"""NIfTI reading, validation, resampled grids and atomic writing, on real files written by nibabel."""

from __future__ import annotations

import gzip
import os
import struct
import tracemalloc
import warnings

import cv2
import nibabel as nib
import numpy as np
import pytest

from microsr_tf import volumes
from microsr_tf.errors import InputError
from microsr_tf.volumes import (VolumeWriter, find_volumes, nifti_stem, open_volume, resampled_affine,
                                resampled_shape, write_volume)


def oblique_affine() -> np.ndarray:
    """Rotated about two axes, anisotropic spacing, shifted origin (representable as a qform)."""
    c, s = np.cos(0.5), np.sin(0.5)
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    ry = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ ry @ np.diag([0.15, 0.2, 0.3])
    aff[:3, 3] = [-12.5, 40.25, 7.0]
    return aff


def save(path, data, affine=None, cls=nib.Nifti1Image, header=None):
    img = cls(data, np.eye(4) if affine is None else affine, header=header)
    nib.save(img, path)
    return path


def assert_one_line_naming(exc: pytest.ExceptionInfo, path) -> None:
    text = str(exc.value)
    assert "\n" not in text
    assert text.startswith(os.fspath(path) + ": ")


def dir_listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


# ---------------------------------------------------------------- reading


def test_scl_slope_and_inter_are_applied(tmp_path, rng):
    raw = rng.integers(-1000, 3000, size=(12, 10, 6)).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.25, -1024.0)
    nib.save(img, tmp_path / "scaled.nii")
    vol = open_volume(tmp_path / "scaled.nii")
    assert np.isnan(vol.header["scl_slope"])  # nibabel moves the scaling onto the proxy
    for k, arr in vol.iter_slices():
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, raw[:, :, k] * 0.25 - 1024.0)
    np.testing.assert_array_equal(vol.read_slice(4, axis=0), raw[4] * 0.25 - 1024.0)


def test_big_endian_data(tmp_path, rng):
    data = rng.normal(size=(9, 7, 5)).astype(">f4")
    save(tmp_path / "be.nii", data, header=nib.Nifti1Header(endianness=">"))
    assert nib.load(tmp_path / "be.nii").header.endianness == ">"
    vol = open_volume(tmp_path / "be.nii")
    for ax in range(3):
        for k, arr in vol.iter_slices(ax):
            np.testing.assert_array_equal(arr, np.take(data, k, axis=ax).astype(np.float32))


def test_sform_only_affine_and_codes_survive_writing(tmp_path, rng):
    aff = oblique_affine()
    aff[:3, 1] += [0.05, 0.0, 0.02]  # a shear only an sform can hold
    img = nib.Nifti1Image(rng.normal(size=(8, 6, 4)).astype(np.float32), None)
    img.header.set_sform(aff, code=1)
    img.header.set_qform(None, code=0)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms(np.linalg.norm(aff[:3, :3], axis=0))  # set_sform leaves pixdim at 1
    nib.save(img, tmp_path / "sform.nii.gz")
    vol = open_volume(tmp_path / "sform.nii.gz")
    assert int(vol.header["qform_code"]) == 0 and int(vol.header["sform_code"]) == 1
    np.testing.assert_allclose(vol.affine, aff, atol=1e-6)

    out_aff = resampled_affine(vol.affine, -1, (2.0, 3.0))
    shape = resampled_shape(vol.shape, -1, (2.0, 3.0))
    write_volume(tmp_path / "out.nii.gz", np.zeros(shape, np.float32), out_aff, header=vol.header)
    out = nib.load(tmp_path / "out.nii.gz")
    assert int(out.header["qform_code"]) == 0 and int(out.header["sform_code"]) == 1
    assert out.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(out.affine, out_aff, atol=1e-6)


def test_an_sform_whose_axes_are_not_pixdim_long_is_refused(tmp_path, rng):
    img = nib.Nifti1Image(rng.normal(size=(8, 6, 4)).astype(np.float32), None)
    img.header.set_sform(np.diag([0.3, 0.3, 0.6, 1.0]), code=2)  # set_sform leaves pixdim at 1 x 1 x 1
    img.header.set_xyzt_units("mm")
    nib.save(img, tmp_path / "ambiguous.nii.gz")
    with pytest.raises(InputError) as exc:
        open_volume(tmp_path / "ambiguous.nii.gz")
    assert_one_line_naming(exc, tmp_path / "ambiguous.nii.gz")
    assert exc.value.problem == ("voxel size is ambiguous: pixdim says 1 x 1 x 1 mm but the sform's axes are "
                                 "0.3 x 0.3 x 0.6 mm long; make pixdim and the sform agree before use")
    img.header.set_zooms((0.3, 0.3, 0.6))  # agreeing, as nibabel writes an affine given to the image
    nib.save(img, tmp_path / "agreeing.nii.gz")
    assert open_volume(tmp_path / "agreeing.nii.gz").spacing == pytest.approx((0.3, 0.3, 0.6))


def test_oblique_qform_volume(tmp_path, rng):
    data = rng.normal(size=(10, 8, 6)).astype(np.float32)
    img = nib.Nifti1Image(data, oblique_affine())
    img.header.set_qform(oblique_affine(), code=1)
    nib.save(img, tmp_path / "oblique.nii")
    vol = open_volume(tmp_path / "oblique.nii")
    np.testing.assert_allclose(vol.affine, oblique_affine(), atol=1e-6)
    np.testing.assert_allclose(vol.spacing, (0.15, 0.2, 0.3), rtol=1e-6)
    np.testing.assert_allclose(vol.in_plane_spacing(-1), (0.15, 0.2), rtol=1e-6)
    np.testing.assert_allclose(vol.in_plane_spacing(1), (0.15, 0.3), rtol=1e-6)
    assert vol.n_slices(0) == 10 and vol.n_slices(-1) == 6 and vol.slice_shape(1) == (10, 6)


def test_nifti2_read_and_written_back_as_nifti2(tmp_path, rng):
    data = rng.normal(size=(7, 9, 5)).astype(np.float32)
    save(tmp_path / "two.nii", data, affine=oblique_affine(), cls=nib.Nifti2Image)
    vol = open_volume(tmp_path / "two.nii")
    assert isinstance(vol.header, nib.Nifti2Header)
    np.testing.assert_array_equal(vol.read_slice(2, axis=1), data[:, 2, :])
    write_volume(tmp_path / "back.nii", data, vol.affine, header=vol.header)
    back = nib.load(tmp_path / "back.nii")
    assert isinstance(back, nib.Nifti2Image)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)


@pytest.mark.parametrize("small_buffers", [False, True])
def test_nii_and_nii_gz_give_identical_slices_on_every_axis(tmp_path, rng, monkeypatch, small_buffers):
    if small_buffers:  # force several slabs per pass and several passes per axis
        monkeypatch.setattr(volumes, "SLAB_BYTES", 3 * 11 * 13 * 8)
        monkeypatch.setattr(volumes, "GATHER_BYTES", 2 * 13 * 17 * 4)
    data = rng.integers(0, 4000, size=(11, 13, 17)).astype(np.uint16)
    save(tmp_path / "a.nii", data)
    save(tmp_path / "a.nii.gz", data)
    plain, packed = open_volume(tmp_path / "a.nii"), open_volume(tmp_path / "a.nii.gz")
    for ax in (0, 1, 2):
        got_plain = dict(plain.iter_slices(ax))
        got_packed = dict(packed.iter_slices(ax))
        assert sorted(got_plain) == list(range(data.shape[ax]))
        for k in got_plain:
            expected = np.take(data, k, axis=ax).astype(np.float32)
            np.testing.assert_array_equal(got_plain[k], expected)
            np.testing.assert_array_equal(got_packed[k], expected)
        for k in (data.shape[ax] - 1, 0, 3):  # random access, backwards too
            np.testing.assert_array_equal(packed.read_slice(k, ax), np.take(data, k, axis=ax))
    chosen = dict(packed.iter_slices(0, indices=[7, 2, 7, -1]))
    assert sorted(chosen) == [2, 7, 10]
    packed.close()
    np.testing.assert_array_equal(packed.read_slice(5), data[:, :, 5])  # reopens after close


def test_multi_member_gzip_is_complete(tmp_path, rng):
    data = rng.normal(size=(16, 16, 8)).astype(np.float32)
    save(tmp_path / "one.nii", data)
    raw = (tmp_path / "one.nii").read_bytes()
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    vol = open_volume(tmp_path / "multi.nii.gz")
    np.testing.assert_array_equal(vol.read_slice(6), data[:, :, 6])


def _stored_gz_with_a_flipped_voxel_byte(tmp_path, data):
    """A .nii.gz in stored (level 0) deflate blocks with one voxel byte flipped: the stream decodes,
    to a wrong voxel, and only the gzip CRC-32 tells."""
    save(tmp_path / "one.nii", data)
    raw = bytearray((tmp_path / "one.nii").read_bytes())
    packed = bytearray(gzip.compress(bytes(raw), compresslevel=0))
    where = packed.index(raw[-200:])  # the stored copy of the last voxels
    packed[where + 100] ^= 0xFF
    (tmp_path / "bad_crc.nii.gz").write_bytes(bytes(packed))
    return tmp_path / "bad_crc.nii.gz"


@pytest.mark.parametrize("axis", [-1, 0])
def test_gzip_crc_is_checked_once_reading_reaches_the_end(tmp_path, rng, axis):
    data = rng.normal(size=(16, 16, 8)).astype(np.float32)
    path = _stored_gz_with_a_flipped_voxel_byte(tmp_path, data)
    vol = open_volume(path)  # the trailer's size is right: open is lazy
    np.testing.assert_array_equal(vol.read_slice(0), data[:, :, 0])  # an early slice is intact and served
    with pytest.raises(InputError) as exc:
        list(vol.iter_slices(axis))
    assert_one_line_naming(exc, path)
    assert "CRC" in exc.value.problem
    save(tmp_path / "good.nii.gz", data)  # the same reads of an intact file pass
    assert sum(1 for _ in open_volume(tmp_path / "good.nii.gz").iter_slices(axis)) == data.shape[axis]


def test_trailing_singleton_fourth_dim_is_squeezed(tmp_path, rng):
    data = rng.normal(size=(6, 5, 4, 1)).astype(np.float32)
    save(tmp_path / "t.nii.gz", data)
    vol = open_volume(tmp_path / "t.nii.gz")
    assert vol.shape == (6, 5, 4)
    np.testing.assert_array_equal(vol.read_slice(1), data[:, :, 1, 0])
    np.testing.assert_array_equal(vol.read_slice(2, axis=0), data[2, :, :, 0])


def test_reading_is_slice_by_slice_in_bounded_memory(tmp_path, rng, monkeypatch):
    data = rng.normal(size=(64, 64, 384)).astype(np.float32)  # 6 MiB
    save(tmp_path / "big.nii.gz", data)
    monkeypatch.setattr(volumes, "SLAB_BYTES", 64 * 64 * 4 * 8)  # 4 last-axis slices per slab
    monkeypatch.setattr(volumes, "GATHER_BYTES", 64 * 384 * 4 * 4)  # 4 axis-0 slices per pass
    vol = open_volume(tmp_path / "big.nii.gz")
    for axis in (-1, 0):
        tracemalloc.start()
        total = sum(float(arr.sum()) for _, arr in vol.iter_slices(axis))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert total == pytest.approx(float(data.astype(np.float64).sum()), rel=1e-4, abs=1e-2)
        assert peak < data.nbytes / 4, (axis, peak)


# ---------------------------------------------------------------- refusals


def _four_d(p, rng):
    save(p, rng.normal(size=(4, 4, 3, 2)).astype(np.float32))


def _two_d(p, rng):
    save(p, np.zeros((4, 4), np.float32))


def _five_d(p, rng):
    save(p, np.zeros((4, 4, 3, 1, 2), np.float32))


def _zero_axis(p, rng):
    save(p, np.zeros((4, 0, 3), np.float32))


def _negative_axis(p, rng):
    save(p, np.zeros((4, 4, 3), np.float32))
    raw = bytearray(p.read_bytes())
    struct.pack_into("<8h", raw, 40, 3, 4, 4, -3, 1, 1, 1, 1)  # dim[3] = -3: nibabel reads the shape as given
    p.write_bytes(bytes(raw))


def _complex(p, rng):
    save(p, np.zeros((4, 4, 3), np.complex64))


def _rgb(p, rng):
    save(p, np.zeros((4, 4, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]))


def _random_bytes(p, rng):
    p.write_bytes(rng.bytes(4096))


def _png_renamed(p, rng):
    ok, buf = cv2.imencode(".png", rng.integers(0, 255, size=(20, 20), dtype=np.uint8))
    p.write_bytes(buf.tobytes())


def _truncated_gz(p, rng):
    save(p, rng.normal(size=(16, 16, 16)).astype(np.float32))
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _truncated_nii(p, rng):
    save(p, rng.normal(size=(16, 16, 16)).astype(np.float32))
    p.write_bytes(p.read_bytes()[:-100])


def _plain_named_gz(p, rng):
    save(p.with_name("x.nii"), rng.normal(size=(4, 4, 3)).astype(np.float32))
    p.with_name("x.nii").rename(p)


def _gz_named_plain(p, rng):
    save(p.with_name("x.nii.gz"), rng.normal(size=(4, 4, 3)).astype(np.float32))
    p.with_name("x.nii.gz").rename(p)


def _nan_spacing(p, rng):
    save(p, np.zeros((4, 4, 3), np.float32))
    hdr = nib.load(p).header.copy()
    hdr["pixdim"][2] = np.nan  # nibabel itself repairs zero or negative pixdim
    hdr["qform_code"] = hdr["sform_code"] = 0
    with open(p, "r+b") as fh:  # patch the header in place; nib.save would recompute pixdim
        hdr.write_to(fh)


def _zero_spacing(p, rng):
    img = nib.Nifti1Image(np.ones((4, 4, 3), np.float32), None)  # spacing from pixdim only
    img.header["pixdim"][1:4] = [0.0, 0.5, 0.5]  # nibabel would read the 0 as 1 mm
    nib.save(img, p)


@pytest.mark.parametrize("name, make, problem", [
    ("zero_spacing.nii.gz", _zero_spacing, "voxel spacing (pixdim) (0.0, 0.5, 0.5)"),
    ("four_d.nii", _four_d, "is 4-D with 2 volumes"),
    ("two_d.nii", _two_d, "is 2-D"),
    ("five_d.nii.gz", _five_d, "has 5 dimensions"),
    ("zero.nii", _zero_axis, "zero-length axis"),
    ("negative.nii", _negative_axis, "negative axis in its header's dim (shape (4, 4, -3))"),
    ("complex.nii", _complex, "unsupported voxel type complex64"),
    ("rgb.nii", _rgb, "unsupported voxel type"),
    ("noise.nii", _random_bytes, "not a readable NIfTI file"),
    ("noise.nii.gz", _random_bytes, "not a readable NIfTI file"),
    ("image.nii", _png_renamed, "not a readable NIfTI file"),
    ("cut.nii.gz", _truncated_gz, "truncated"),
    ("cut.nii", _truncated_nii, "truncated"),
    ("nan_spacing.nii", _nan_spacing, "voxel spacing"),
    ("plain.nii.gz", _plain_named_gz, "is named .nii.gz but is not gzip-compressed; rename it to .nii"),
    ("packed.nii", _gz_named_plain, "is gzip-compressed but named .nii; rename it to .nii.gz"),
])
def test_bad_files_are_refused_at_open(tmp_path, rng, name, make, problem):
    path = tmp_path / name
    make(path, rng)
    with pytest.raises(InputError) as exc:
        open_volume(path)
    assert_one_line_naming(exc, path)
    assert problem in exc.value.problem


def test_negative_pixdim_reads_as_its_size_without_printing(tmp_path, rng, capfd):
    path = tmp_path / "flipped.nii.gz"
    img = nib.Nifti1Image(rng.random((4, 5, 3)).astype(np.float32), None)
    img.header["pixdim"][1:4] = [-0.5, 0.25, 2.0]
    nib.save(img, path)
    capfd.readouterr()
    assert open_volume(path).spacing == (0.5, 0.25, 2.0)
    assert capfd.readouterr().err == ""  # nibabel's "pixdim should be positive" repair note stays quiet


@pytest.mark.parametrize("unit, expected", [("micron", (0.018, 0.018, 0.036)), ("mm", (18.0, 18.0, 36.0)),
                                            ("meter", (18000.0, 18000.0, 36000.0))])
def test_spacing_is_in_mm_whatever_the_header_unit(tmp_path, rng, unit, expected):
    path = tmp_path / f"{unit}.nii.gz"
    img = nib.Nifti1Image(rng.random((4, 5, 3)).astype(np.float32), np.diag([18.0, 18.0, 36.0, 1.0]))
    img.header.set_xyzt_units(xyz=unit)
    nib.save(img, path)
    assert open_volume(path).spacing == pytest.approx(expected)


def test_make_output_dir_creates_and_refuses_in_one_line(tmp_path):
    nested = volumes.make_output_dir(tmp_path / "a" / "b")
    assert nested.is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError) as exc:
        volumes.make_output_dir(blocker)
    assert_one_line_naming(exc, blocker)
    assert "not a directory" in exc.value.problem
    with pytest.raises(InputError) as exc:
        volumes.make_output_dir(blocker / "sub")
    assert_one_line_naming(exc, blocker / "sub")
    assert "cannot create the output folder" in exc.value.problem


def test_missing_file_and_wrong_kind_of_path(tmp_path):
    with pytest.raises(InputError) as exc:
        open_volume(tmp_path / "absent.nii.gz")
    assert_one_line_naming(exc, tmp_path / "absent.nii.gz")
    assert exc.value.problem == "file not found"
    (tmp_path / "dir.nii").mkdir()  # a folder is read as a DICOM series: this one holds nothing
    with pytest.raises(InputError, match="is empty; expected the files of one DICOM series"):
        open_volume(tmp_path / "dir.nii")
    save(tmp_path / "scan.img", np.zeros((2, 2, 2), np.float32), cls=nib.Nifti1Pair)
    with pytest.raises(InputError, match="is a .img volume, which is not read; convert it to NIfTI"):
        open_volume(tmp_path / "scan.img")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a NIfTI file name"):
        open_volume(tmp_path / "notes.txt")


def test_a_micro_ct_slice_stack_says_to_convert_it_with_its_voxel_size(tmp_path, rng):
    """Micro-CT scanners export reconstructions as TIFF or BMP stacks: given as a scan, as a series folder or
    as a training folder, the message names the format and the conversion instead of "not DICOM"."""
    stack = tmp_path / "stack"
    stack.mkdir()
    for k in range(3):
        cv2.imwrite(str(stack / f"rec_{k:04d}.tif"), rng.integers(0, 60000, (20, 20)).astype(np.uint16))
    hint = "is a .tif image, not a volume: a slice stack carries no voxel size; convert the stack to NIfTI"
    for path in (stack, stack / "rec_0000.tif"):
        with pytest.raises(InputError) as exc:
            open_volume(path)
        assert_one_line_naming(exc, stack / "rec_0000.tif")
        assert exc.value.problem.startswith(hint)
    with pytest.raises(InputError) as exc:
        volumes.find_volumes(stack)
    assert_one_line_naming(exc, stack)
    assert exc.value.problem.startswith(f"holds no volume this tool reads: rec_0000.tif {hint}")


def test_voxels_beyond_float32_arithmetic_are_refused_by_size_without_warnings(tmp_path, rng):
    # every voxel finite, but bicubic overshoot and the statistics would overflow float32 downstream
    data = rng.normal(size=(6, 5, 4)).astype(np.float32)
    data[2, 3, 1] = 3e38
    src = save(tmp_path / "huge.nii.gz", data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vol = open_volume(src)
        vol.read_slice(0)
        with pytest.raises(InputError) as exc:
            vol.read_slice(1)
    assert_one_line_naming(exc, src)
    assert exc.value.problem == ("slice 1 along axis 2 has a voxel of magnitude 3e+38; values beyond 1e+30 cannot "
                                 "be resampled in float32: rescale the image")
    data[2, 3, 1] = -1e29  # large, yet far from overflowing: read as it is
    np.testing.assert_array_equal(open_volume(save(tmp_path / "large.nii.gz", data)).read_slice(1), data[:, :, 1])


@pytest.mark.parametrize("axis", [2, 0])
def test_a_scaling_that_overflows_float32_is_named_as_the_scaling(tmp_path, rng, axis):
    raw = rng.integers(-1000, 3000, size=(6, 5, 4)).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(1e38, 0.0)  # int16 values times 1e38 pass float32's 3.4e38
    src = tmp_path / "slope.nii"
    nib.save(img, src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the overflowing cast is not printed: the message says it
        with pytest.raises(InputError) as exc:
            open_volume(src).read_slice(0, axis=axis)
    assert_one_line_naming(exc, src)
    assert exc.value.problem == (f"the intensity scaling (scl_slope 1e+38, scl_inter 0) takes slice 0 along axis {axis} "
                                 "beyond the float32 range; the scaling is wrong")


@pytest.mark.parametrize("bad, label", [(np.nan, "1 NaN and 0 Inf"), (np.inf, "0 NaN and 1 Inf"),
                                        (-np.inf, "0 NaN and 1 Inf")])
def test_non_finite_voxels_refused_as_read_and_nothing_written(tmp_path, rng, bad, label):
    data = rng.normal(size=(6, 5, 4)).astype(np.float32)
    data[2, 3, 1] = bad
    src = save(tmp_path / "src.nii.gz", data)
    vol = open_volume(src)
    np.testing.assert_array_equal(vol.read_slice(0), data[:, :, 0])  # clean slices still read
    with pytest.raises(InputError) as exc:
        vol.read_slice(1)
    assert_one_line_naming(exc, src)
    assert f"slice 1 along axis 2 has {label} voxels" in str(exc.value)
    with pytest.raises(InputError, match="slice 2 along axis 0"):
        dict(vol.iter_slices(0))
    with pytest.raises(InputError):
        list(vol.iter_slices())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError):
        with VolumeWriter(out / "res.nii.gz", vol.shape, vol.affine, header=vol.header) as writer:
            for k, arr in vol.iter_slices():
                writer.write_slice(k, arr)
    assert dir_listing(out) == []


def test_a_clean_volume_reads_along_every_axis(tmp_path, rng):
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    vol = open_volume(save(tmp_path / "ok.nii", data))
    for axis in range(3):
        np.testing.assert_array_equal(np.stack([a for _, a in vol.iter_slices(axis)], axis), data)


def test_slice_index_out_of_range(tmp_path):
    vol = open_volume(save(tmp_path / "s.nii", np.zeros((3, 4, 5), np.float32)))
    with pytest.raises(IndexError):
        vol.read_slice(5)
    np.testing.assert_array_equal(vol.read_slice(-1, axis=0), np.zeros((4, 5)))


# ---------------------------------------------------------------- finding


def test_find_volumes_sorted_and_filtered(tmp_path):
    for name in ("b.nii.gz", "a.nii", "C.NII.GZ", "notes.txt", ".hidden.nii", "scan.nii.gz.part"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "series").mkdir()  # a subfolder is one volume: a DICOM series
    assert [p.name for p in find_volumes(tmp_path)] == ["C.NII.GZ", "a.nii", "b.nii.gz", "series"]


def test_find_volumes_refusals(tmp_path):
    with pytest.raises(InputError, match="directory not found"):
        find_volumes(tmp_path / "nope")
    (tmp_path / "file.nii").write_bytes(b"x")
    with pytest.raises(InputError, match="not a directory"):
        find_volumes(tmp_path / "file.nii")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no volumes")
    with pytest.raises(InputError) as exc:
        find_volumes(tmp_path / "empty")
    assert_one_line_naming(exc, tmp_path / "empty")
    links = tmp_path / "links"  # a volume's link whose target is gone is refused, not skipped
    links.mkdir()
    (links / "a.nii.gz").write_bytes(b"x")
    os.symlink(tmp_path / "moved" / "readme.txt", links / "readme.txt")  # not a volume's name: ignored
    assert find_volumes(links) == [links / "a.nii.gz"]
    for name in ("b.nii.gz", "series", "ear.DCM"):
        os.symlink(tmp_path / "moved" / name, links / name)
        with pytest.raises(InputError, match="is a broken link") as exc:
            find_volumes(links)
        assert_one_line_naming(exc, links / name)
        os.unlink(links / name)


def test_nifti_stem():
    assert nifti_stem("/x/scan.01.nii.gz") == "scan.01"
    assert nifti_stem("scan.NII") == "scan"


# ---------------------------------------------------------------- resampled grids


def test_resampled_shape_rounds_each_in_plane_axis():
    assert resampled_shape((668, 600, 500), -1, (8.333, 2.0)) == (5566, 1200, 500)
    assert resampled_shape((10, 20, 30), 0, (1.5, 2.5)) == (10, 30, 75)
    assert resampled_shape((10, 20, 30), 1, (1.0, 1.0)) == (10, 20, 30)


@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("factors", [(8.0, 8.0), (8.333, 3.7), (1.0, 2.5)])
def test_resampled_affine_maps_corresponding_points_to_same_world_position(axis, factors):
    aff = oblique_affine()
    new = resampled_affine(aff, axis, factors)
    a, b = volumes.in_plane_axes(axis)
    rng = np.random.default_rng(7)
    old_idx = rng.uniform(-0.5, 40.0, size=(50, 3))
    new_idx = old_idx.copy()
    new_idx[:, a] = (old_idx[:, a] + 0.5) * factors[0] - 0.5
    new_idx[:, b] = (old_idx[:, b] + 0.5) * factors[1] - 0.5
    world_old = nib.affines.apply_affine(aff, old_idx)
    world_new = nib.affines.apply_affine(new, new_idx)
    np.testing.assert_allclose(world_new, world_old, atol=1e-4, rtol=0)
    # The outer voxel edge (-0.5) is shared; new voxels are 1/f as wide along in-plane axes.
    edge = nib.affines.apply_affine(aff, [-0.5, -0.5, -0.5])
    np.testing.assert_allclose(nib.affines.apply_affine(new, [-0.5, -0.5, -0.5]), edge, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(new[:3, a]), np.linalg.norm(aff[:3, a]) / factors[0])


# ---------------------------------------------------------------- writing


@pytest.mark.parametrize("name", ["out.nii", "out.nii.gz"])
@pytest.mark.parametrize("axis", [0, -1])
def test_slice_by_slice_writer_equals_array(tmp_path, rng, name, axis):
    data = rng.normal(size=(9, 7, 5)).astype(np.float32)
    aff = oblique_affine()
    with VolumeWriter(tmp_path / name, data.shape, aff, axis=axis) as writer:
        for k in range(data.shape[axis]):
            writer.write_slice(k, np.take(data, k, axis=axis))
    assert dir_listing(tmp_path) == [name]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    img = nib.load(tmp_path / name)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, aff, atol=1e-6)
    np.testing.assert_allclose(img.header.get_zooms(), (0.15, 0.2, 0.3), rtol=1e-6)
    reread = open_volume(tmp_path / name)
    np.testing.assert_array_equal(reread.read_slice(3, axis=1), data[:, 3, :])


def test_writer_exception_leaves_no_file_and_no_temp_files(tmp_path, rng):
    with pytest.raises(RuntimeError, match="boom"):
        with VolumeWriter(tmp_path / "x.nii.gz", (8, 8, 4), np.eye(4)) as writer:
            writer.write_slice(0, rng.normal(size=(8, 8)))
            assert len(dir_listing(tmp_path)) == 1  # the hidden temp file exists meanwhile
            raise RuntimeError("boom")
    assert dir_listing(tmp_path) == []


def test_writer_abort_and_missing_slices_leave_nothing(tmp_path):
    writer = VolumeWriter(tmp_path / "a.nii", (4, 4, 3), np.eye(4))
    writer.write_slice(0, np.ones((4, 4)))
    writer.abort()
    assert dir_listing(tmp_path) == []
    with pytest.raises(ValueError, match="2 of 3 slices were never written"):
        with VolumeWriter(tmp_path / "b.nii.gz", (4, 4, 3), np.eye(4)) as writer:
            writer.write_slice(1, np.ones((4, 4)))
    assert dir_listing(tmp_path) == []


def test_writer_refuses_bad_slices_and_paths(tmp_path):
    with VolumeWriter(tmp_path / "c.nii", (4, 5, 2), np.eye(4), axis=1) as writer:
        with pytest.raises(ValueError, match="expected \\(4, 2\\)"):
            writer.write_slice(0, np.zeros((4, 5)))
        with pytest.raises(IndexError):
            writer.write_slice(5, np.zeros((4, 2)))
        for k in range(5):
            writer.write_slice(k, np.full((4, 2), k))
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "c.nii").dataobj)[0, :, 0], np.arange(5))
    with pytest.raises(InputError, match="output directory does not exist"):
        VolumeWriter(tmp_path / "no" / "d.nii", (2, 2, 2), np.eye(4))
    with pytest.raises(InputError, match="must end in .nii or .nii.gz"):
        VolumeWriter(tmp_path / "d.mgz", (2, 2, 2), np.eye(4))
    assert dir_listing(tmp_path) == ["c.nii"]


def test_write_volume_overwrites_atomically_and_keeps_dtype(tmp_path, rng):
    target = tmp_path / "v.nii.gz"
    first = rng.integers(0, 100, size=(5, 6, 7)).astype(np.int16)
    write_volume(target, first, np.diag([0.5, 0.5, 1.0, 1.0]), dtype=np.int16)
    img = nib.load(target)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(img.dataobj), first)
    second = rng.normal(size=(5, 6, 7)).astype(np.float32)
    write_volume(target, second, np.eye(4))
    np.testing.assert_array_equal(np.asarray(nib.load(target).dataobj), second)
    assert dir_listing(tmp_path) == ["v.nii.gz"]
