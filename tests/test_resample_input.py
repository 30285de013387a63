"""--resample-input: scans at half and twice the model's LR spacing are refused by default with the way
forward, and with it land on the model's HR grid at the right place in world space."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from microsr_tf.cli.main import cli
from microsr_tf.errors import InputError
from microsr_tf.inference.mc import MCResult
from microsr_tf.inference.predict import InputResampling, plan_volume, predict_volume
from microsr_tf.models.artifact import save_generator
from microsr_tf.models.generator import ResnetGenerator
from microsr_tf.preprocessing import IntensityStats
from microsr_tf.volumes import resampled_affine

HR = 0.1  # the model's HR spacing (mm)
FACTOR = 4  # trained factor: the model's LR spacing is 0.4 mm
STATS = IntensityStats(mean=1000.0, std=500.0, low=-3.0, high=3.0)  # [0, 1] <-> [-500, 2500]
META = {"format": 1, "hr_spacing": [HR, HR], "lr_spacing": [0.4, 0.4], "factors": [float(FACTOR)] * 2,
        "hr_stats": STATS.to_dict(), "lr_stats": STATS.to_dict(), "axis": -1, "patch_size": 32,
        "model": {"ngf": 4, "n_blocks": 1}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A training-run-like directory holding a tiny untrained generator for the CLI runs."""
    run = tmp_path_factory.mktemp("run")
    gen = ResnetGenerator(ngf=4, n_blocks=1)
    gen(np.zeros((1, 32, 32, 1), np.float32))
    save_generator(gen, run / "generator.keras", META)
    return run


def oblique(zooms, origin=(12.0, -7.5, 30.0)) -> np.ndarray:
    """An oblique affine: rotated about an axis off every coordinate axis, then translated."""
    axis = np.array([1.0, -2.0, 0.7]) / np.linalg.norm([1.0, -2.0, 0.7])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(0.8) * k + (1 - np.cos(0.8)) * k @ k
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(zooms)
    aff[:3, 3] = origin
    return aff


def world(affine, ijk):
    return np.asarray(ijk, np.float64) @ affine[:3, :3].T + affine[:3, 3]


def all_voxels(shape):
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)


CENTRE_MM = (7.3, 8.9)  # blob centre along the two in-plane axes, in mm from the grid's outer edge
SIGMA = 2.0  # mm


def pattern_at(affine_in, points):
    """The smooth test pattern at world ``points``: a Gaussian blob on a plateau, centred in slice 1."""
    spacing = np.linalg.norm(affine_in[:3, 0])
    centre = world(affine_in, [CENTRE_MM[0] / spacing - 0.5, CENTRE_MM[1] / spacing - 0.5, 1.0])
    d2 = ((points - centre) ** 2).sum(-1)
    return 1000.0 + 800.0 * np.exp(-d2 / (2 * SIGMA ** 2)), centre


def write_scan(path, spacing, fov=16.0, n_slices=3, dtype=np.float32):
    """A 16 mm square field of view at in-plane ``spacing``, holding the test pattern at its voxel centres."""
    n = int(round(fov / spacing))
    affine = oblique((spacing, spacing, 1.5))
    values, _ = pattern_at(affine, world(affine, all_voxels((n, n, n_slices))))
    nib.save(nib.Nifti1Image(values.reshape(n, n, n_slices).astype(dtype), affine), path)
    return path, affine


def identity_engine(image, slice_seed):
    """A posterior whose mean is its input: the output is then the network's input, mapped to HR units."""
    return MCResult(mean=image.copy(), var=np.zeros_like(image), samples=2, seed=slice_seed)


# ---------------------------------------------------------------------------------------------- default


@pytest.mark.parametrize("spacing, words", [(0.2, "trained for factors 4 x 4"), (0.8, "trained for factors 4 x 4"),
                                            (0.05, "not coarser")])
def test_other_spacing_is_refused_by_default_naming_the_way_forward(tmp_path, model_dir, spacing, words):
    src, _ = write_scan(tmp_path / "scan.nii.gz", spacing, fov=4.0)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(src), "--model", str(model_dir), "--out-dir", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert str(src) in lines[0] and words in lines[0]
    assert "--resample-input" in lines[0] and "0.4 x 0.4 mm" in lines[0]
    assert not out.exists()


def test_a_scan_within_tolerance_is_not_resampled(tmp_path):
    src, _ = write_scan(tmp_path / "near.nii.gz", 0.41, fov=4.0)
    plan = plan_volume(src, META, resample_input=True)
    assert plan.resampling is None and plan.factors == pytest.approx((4.1, 4.1))


# ---------------------------------------------------------------------------------------------- grid


@pytest.mark.parametrize("spacing, lr_shape, out_shape", [(0.2, (5, 6), (20, 24)), (0.8, (20, 24), (80, 96))],
                         ids=["half", "twice"])
@pytest.mark.parametrize("roi", [None, ((3, 9), (2, 11), (1, 3))], ids=["whole", "roi"])
def test_output_grid_is_the_model_hr_grid_in_the_right_place(tmp_path, spacing, lr_shape, out_shape, roi):
    shape = (10, 12, 4)
    affine = oblique((spacing, spacing, 1.5))
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), tmp_path / "scan.nii.gz")
    plan = plan_volume(tmp_path / "scan.nii.gz", META, roi=roi, resample_input=True)
    assert plan.resampling.from_spacing == pytest.approx((spacing, spacing), rel=1e-6)
    assert plan.resampling.to_spacing == pytest.approx((0.4, 0.4))
    assert plan.factors == (4.0, 4.0)
    if roi is None:  # by hand: round(10 * s / 0.4), round(12 * s / 0.4) on the LR grid, then x4
        assert plan.out_shape == (*out_shape, 4)
    zooms = np.linalg.norm(plan.out_affine[:3, :3], axis=0)
    np.testing.assert_allclose(zooms, (HR, HR, 1.5), rtol=1e-6)
    # Independently: output voxel j's centre sits at input index lo + (j + 0.5) * HR / s - 0.5 in-plane
    # (grids share their outer edge) and at input slice lo + k.
    lo = np.array([0, 0, 0]) if roi is None else np.array([r[0] for r in roi])
    ijk = all_voxels(plan.out_shape)
    src = ijk.copy()
    src[:, :2] = (ijk[:, :2] + 0.5) * HR / spacing - 0.5
    src += lo
    np.testing.assert_allclose(world(plan.out_affine, ijk), world(affine, src), atol=1e-6)


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("spacing", [0.2, 0.8], ids=["half", "twice"])
def test_smooth_pattern_comes_out_where_it_should(tmp_path, spacing):
    src, affine = write_scan(tmp_path / "scan.nii.gz", spacing)
    res = predict_volume(src, None, META, tmp_path / "out", samples=2, seed=0, normalize="model",
                         engine=identity_engine, resample_input=True)
    img = nib.load(res.outputs["mean"])
    assert img.shape == (160, 160, 3)
    np.testing.assert_allclose(img.header.get_zooms(), (HR, HR, 1.5), rtol=1e-6)
    out = np.asarray(img.dataobj, dtype=np.float64)
    ijk = all_voxels(img.shape)
    truth, centre = pattern_at(affine, world(img.affine, ijk))
    truth = truth.reshape(img.shape)
    inner = (slice(20, -20), slice(20, -20), slice(None))  # 2 mm from the edges, where borders are replicated
    err = np.abs(out - truth)[inner].max()
    assert err < (1.0 if spacing == 0.2 else 5.0), err  # of an 800 peak (measured 0.3 and 2.7): bicubic twice over
    weights = (out - 1000.0).clip(0)[..., 1].ravel()
    pts = world(img.affine, all_voxels(img.shape[:2] + (1,)) + [0, 0, 1])
    found = (weights[:, None] * pts).sum(0) / weights.sum()
    assert np.linalg.norm(found - centre) < 0.01, (found, centre)  # mm (measured 0.002; an HR voxel is 0.1)
    assert res.resampling["from_spacing_mm"] == pytest.approx([spacing] * 2)
    assert res.resampling["to_spacing_mm"] == pytest.approx([0.4, 0.4])
    descrip = img.header["descrip"].item().decode()
    assert descrip == f"microsr-tf: input {spacing:g}x{spacing:g} mm resampled to 0.4x0.4 mm (bicubic)"
    assert "input resampled from" in res.summary()


@pytest.mark.parametrize("spacing", [0.2, 0.8], ids=["half", "twice"])
def test_resample_input_equals_resampling_first_then_predicting(tmp_path, spacing):
    """The scan's own intensity statistics are taken on the resampled slices, as if the user had
    resampled the scan to the model's LR spacing beforehand and predicted that."""
    src, affine = write_scan(tmp_path / "scan.nii.gz", spacing)
    step = InputResampling((spacing, spacing), (0.4, 0.4))
    raw = np.asarray(nib.load(src).dataobj)
    lr = np.stack([step.apply(raw[:, :, k]) for k in range(raw.shape[2])], axis=-1)
    lr_affine = resampled_affine(affine, -1, step.factors)
    nib.save(nib.Nifti1Image(lr, lr_affine), tmp_path / "pre.nii.gz")
    kw = dict(samples=2, seed=0, normalize="volume", engine=identity_engine)
    a = predict_volume(src, None, META, tmp_path / "a", resample_input=True, **kw)
    b = predict_volume(tmp_path / "pre.nii.gz", None, META, tmp_path / "b", **kw)
    assert a.resampling is not None and b.resampling is None
    ma, mb = (nib.load(r.outputs["mean"]) for r in (a, b))
    np.testing.assert_allclose(ma.affine, mb.affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ma.dataobj), np.asarray(mb.dataobj), rtol=1e-5, atol=1e-3)


def test_coarsening_is_anti_aliased_like_pillow_bicubic():
    """Half the LR spacing: stripes finer than the LR grid can hold are removed, not folded into
    coarser ones, and the interior equals Pillow's anti-aliased bicubic (Keys, a = -0.5) resize."""
    step = InputResampling((0.2, 0.2), (0.4, 0.4))
    x = np.arange(240)
    for period, low, high in ((2.5, 0.0, 0.05), (40.0, 0.99, 1.0)):
        stripes = np.tile(np.cos(2 * np.pi * x / period)[:, None], (1, 16))
        amplitude = np.abs(step.apply(stripes)[10:-10]).max()
        assert low <= amplitude <= high, (period, amplitude)
    rng = np.random.default_rng(3)
    img = rng.normal(size=(64, 48)).astype(np.float32)
    for factors in ((0.5, 0.5), (0.25, 0.75)):
        out = InputResampling((1.0, 1.0), tuple(1 / f for f in factors)).apply(img)
        h, w = out.shape
        ref = np.asarray(Image.fromarray(img, mode="F").resize((w, h), Image.BICUBIC, box=(0, 0, 48, 64)))
        np.testing.assert_allclose(out[8:-8, 8:-8], ref[8:-8, 8:-8], atol=2e-6)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_resample_input_end_to_end(tmp_path, model_dir):
    src, affine = write_scan(tmp_path / "head.nii.gz", 0.8, fov=8.0, n_slices=2, dtype=np.int16)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(src), "--model", str(model_dir), "--out-dir", str(out),
                                      "-T", "2", "--seed", "1", "--tile", "32", "--resample-input"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ["head_mean.nii.gz", "head_var.nii.gz"]
    assert "input resampled from 0.8 x 0.8 mm to 0.4 x 0.4 mm" in result.output
    for name in ("head_mean.nii.gz", "head_var.nii.gz"):
        img = nib.load(out / name)
        assert img.shape == (80, 80, 2)
        np.testing.assert_allclose(img.header.get_zooms(), (HR, HR, 1.5), rtol=1e-6)
        assert b"resampled to 0.4x0.4 mm" in img.header["descrip"].item()
        # the output's outer edge is the input's: voxel (-0.5, -0.5) of both grids coincide
        np.testing.assert_allclose(world(img.affine, [-0.5, -0.5, 0]), world(affine, [-0.5, -0.5, 0]), atol=1e-5)


def test_the_recorded_resampling_always_fits_the_nifti_description():
    assert len(InputResampling((0.0001234, 0.0005678), (0.4567891, 0.1234567)).description()) <= 80
    text = InputResampling((0.15, 0.15), (0.48, 0.48)).description()
    assert text == "microsr-tf: input 0.15x0.15 mm resampled to 0.48x0.48 mm (bicubic)"


def test_library_refusal_names_the_option(tmp_path):
    src, _ = write_scan(tmp_path / "fine.nii.gz", 0.2, fov=4.0)
    with pytest.raises(InputError, match="resample_input=True"):
        plan_volume(src, META)
