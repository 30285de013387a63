"""Synthetic temporal-bone phantoms: layout, pairing, headers, image quality per domain, anatomy, CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from microsr_tf.cli.phantom import command
from microsr_tf.errors import ConfigError, InputError
from microsr_tf.phantoms import (SIZES, PhantomSpec, generate_subject, get_spec, render_hr, render_lr,
                                 write_phantoms)

# The small size's 11.5 mm field of view on coarser grids, so a whole data set renders in about a second.
TINY = dataclasses.replace(SIZES["small"], name="tiny", hr_shape=(144, 144, 16), hr_spacing=(0.08, 0.08, 0.08),
                           lr_shape=(18, 18, 16), lr_spacing=(0.64, 0.64, 0.08), lr_views=48)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms") / "set"
    manifest = write_phantoms(out, subjects=2, seed=11, size=TINY)
    return out, manifest


@pytest.fixture(scope="module")
def subject():
    return generate_subject(np.random.default_rng(5), TINY)


def _load(path):
    img = nib.load(str(path))
    return img, np.asarray(img.dataobj, dtype=np.float64)


def test_layout_and_manifest(dataset):
    out, manifest = dataset
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == 11 and manifest["size"] == "tiny" and manifest["subjects"] == 2
    roles = [f["role"] for f in manifest["files"]]
    assert sorted(roles) == ["test_hr", "test_lr", "train_hr", "train_hr", "train_lr", "train_lr"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert on_disk == sorted(f["path"] for f in manifest["files"])
    folders = {"train_lr": "lr", "train_hr": "hr", "test_lr": "test/lr", "test_hr": "test/hr"}
    for f in manifest["files"]:
        assert f["path"].rsplit("/", 1)[0] == folders[f["role"]]
        img, _ = _load(out / f["path"])
        assert list(img.shape) == f["shape"]
        assert f["spacing"] == list(TINY.lr_spacing if f["role"].endswith("lr") else TINY.hr_spacing)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left behind


def test_unpaired_training_sets_and_paired_test_subject(dataset):
    out, manifest = dataset
    by_role = {}
    for f in manifest["files"]:
        by_role.setdefault(f["role"], []).append(f)
    train_lr = {f["subject"] for f in by_role["train_lr"]}
    train_hr = {f["subject"] for f in by_role["train_hr"]}
    (test_lr,), (test_hr,) = by_role["test_lr"], by_role["test_hr"]
    assert len(train_lr) == len(train_hr) == 2 and not train_lr & train_hr
    assert test_lr["subject"] == test_hr["subject"] and test_lr["subject"] not in train_lr | train_hr

    # The test pair is the same anatomy: HR averaged onto the LR grid matches its LR twin far better
    # than it matches another subject's LR volume.
    def coarse(path):
        _, hr = _load(out / path)
        return hr.reshape(18, 8, 18, 8, 16).mean(axis=(1, 3))

    hr_test = coarse(test_hr["path"]).ravel()
    corr_pair = np.corrcoef(hr_test, _load(out / test_lr["path"])[1].ravel())[0, 1]
    corr_other = np.corrcoef(hr_test, _load(out / by_role["train_lr"][0]["path"])[1].ravel())[0, 1]
    assert corr_pair > 0.8
    assert corr_pair > corr_other + 0.15


def test_headers_carry_spacings_and_a_shared_field_of_view(dataset):
    out, manifest = dataset
    fovs = []
    for f in manifest["files"]:
        img, _ = _load(out / f["path"])
        hdr = img.header
        np.testing.assert_allclose(hdr.get_zooms(), f["spacing"], rtol=1e-6)
        np.testing.assert_allclose(np.diag(img.affine)[:3], f["spacing"], rtol=1e-6)
        assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1
        assert hdr.get_xyzt_units()[0] == "mm"
        assert hdr.get_data_dtype() == (np.int16 if f["modality"] == "cbct" else np.uint16)
        # world position of the grid's outer corner: the same field of view at both resolutions
        corner = img.affine @ np.array([-0.5, -0.5, -0.5, 1.0])
        fovs.append(np.concatenate([corner[:3], np.array(f["shape"]) * f["spacing"]]))
    np.testing.assert_allclose(fovs, np.repeat(fovs[:1], len(fovs), axis=0), atol=1e-4)
    lr_spacing = manifest["spec"]["lr_spacing"]
    hr_spacing = manifest["spec"]["hr_spacing"]
    assert [lr_spacing[i] / hr_spacing[i] for i in range(3)] == pytest.approx([8.0, 8.0, 1.0])


def test_intensity_calibrations_differ(dataset):
    out, manifest = dataset
    for f in manifest["files"]:
        _, data = _load(out / f["path"])
        if f["modality"] == "cbct":  # Hounsfield-like: air near -1000, dense bone around +1000
            assert data.min() < -600 and 400 < np.percentile(data, 99.5) < 2500
        else:  # micro-CT grey values: positive, dense bone in the tens of thousands
            assert data.min() > 0 and np.percentile(data, 99.5) > 20000


def _noise(render, gain):
    """Noise standard deviation in attenuation units, from the difference of two noise draws."""
    return float(np.std(render(np.random.default_rng(1)) - render(np.random.default_rng(2)))) / math.sqrt(2) / gain


def _high_frequency(volume):
    """Share of in-plane structure finer than about two voxels: how sharp a grid's content is."""
    return float(np.std(volume - ndimage.gaussian_filter(volume, (1, 1, 0))) / np.std(volume))


def test_hr_is_less_noisy_than_lr(subject):
    hr_noise = _noise(lambda rng: render_hr(subject, TINY, rng), subject["hr_calibration"]["gain"])
    lr_noise = _noise(lambda rng: render_lr(subject, TINY, rng), 1000.0 * subject["lr_calibration"]["gain"])
    assert 0.005 < hr_noise < 0.03 and 0.02 < lr_noise < 0.1
    assert hr_noise < 0.5 * lr_noise


def test_hr_edges_are_sharp_and_lr_is_blurred_beyond_its_voxels(subject):
    quiet = dataclasses.replace(TINY, hr_noise=0.0, lr_noise_hu=0.0)
    hr = render_hr(subject, quiet) / subject["hr_calibration"]["gain"]
    lr = render_lr(subject, quiet, np.random.default_rng(0)) / (1000.0 * subject["lr_calibration"]["gain"])

    def slope(volume, spacing):  # steepest in-plane edges, attenuation per mm
        return float(np.percentile(np.hypot(*np.gradient(volume, axis=(0, 1))), 99.5)) / spacing

    assert slope(hr, TINY.hr_spacing[0]) > 4 * slope(lr, TINY.lr_spacing[0])
    # On the LR grid, the CBCT point spread function (wider than a voxel) leaves less fine detail than
    # simply averaging the micro-CT rendering of the same anatomy into LR voxels.
    boxed = hr.reshape(18, 8, 18, 8, -1).mean(axis=(1, 3))
    assert _high_frequency(lr) < 0.85 * _high_frequency(boxed)


def test_cochlea_spiral_canal_in_a_slice(subject):
    spec = dataclasses.replace(TINY, hr_shape=(144, 144, 36), lr_shape=(18, 18, 36))  # room for the cochlea
    hr = render_hr(subject, spec)
    coch = subject["cochlea"]
    cal = subject["hr_calibration"]
    mu = (hr - cal["offset"]) / cal["gain"]  # back to attenuation, water = 1
    dx = spec.hr_spacing[0]
    # Centreline of the upper scala (half-way between the spiral lamina and the roof of the canal) from
    # the cochlea's parameters; keep the points lying in one slice.
    t = np.linspace(0.0, coch.t_max, 4000)
    shrink = 1 - coch.taper * t / coch.t_max
    line = np.array([coch.centreline(v) for v in t]) + (0.5 * coch.axial * shrink)[:, None] * coch.axis
    k = int(round((coch.base[2] + coch.axis[2] * coch.rise * 0.3) / dx + spec.hr_shape[2] / 2 - 0.5))
    z_k = (k + 0.5) * dx - spec.fov[2] / 2
    near = np.abs(line[:, 2] - z_k) < dx / 2
    assert near.sum() > 20
    ij = np.floor((line[near, :2] + spec.fov[0] / 2) / dx).astype(int)
    # The canal is fluid along that line, over a long arc around the modiolus.
    fluid = mu[:, :, k] < 1.2
    assert fluid[ij[:, 0], ij[:, 1]].mean() > 0.9
    swept = np.degrees(np.ptp(np.unwrap(np.arctan2(*(line[near, :2] - coch.base[:2]).T[::-1]))))
    assert swept > 90
    # Canal calibre: the distance from that line to the canal wall matches the tapered semi-axes.
    depth = ndimage.distance_transform_edt(fluid)[ij[:, 0], ij[:, 1]] * dx
    tilt = math.acos(abs(coch.axis[2]))
    assert np.median(depth) > 0.25 * coch.axial * shrink[near].min()
    assert np.median(depth) < 1.5 * coch.radial * shrink[near].max() / math.cos(tilt)
    assert 2.25 <= subject["cochlea_turns"] <= 2.75


def test_same_seed_same_files_other_seed_different(tmp_path):
    spec = dataclasses.replace(TINY, hr_shape=(144, 144, 4), lr_shape=(18, 18, 4))
    runs = {name: write_phantoms(tmp_path / name, 1, seed, size=spec) for name, seed in
            (("a", 3), ("b", 3), ("c", 4))}
    assert runs["a"]["files"] == runs["b"]["files"]
    for f in runs["a"]["files"]:
        same = [_load(tmp_path / name / f["path"])[1] for name in "abc"]
        np.testing.assert_array_equal(same[0], same[1])
        assert not np.array_equal(same[0], same[2])


def test_subjects_differ_in_anatomy():
    a, b = (generate_subject(np.random.default_rng(s), "small") for s in (1, 2))
    assert a["cochlea_turns"] != b["cochlea_turns"]
    assert not np.allclose(a["cochlea"].base, b["cochlea"].base)
    assert len(a["air_cells"]) > 5 and len(b["air_cells"]) > 5


def test_overwrite_replaces_an_earlier_set(tmp_path):
    spec = dataclasses.replace(TINY, hr_shape=(144, 144, 2), lr_shape=(18, 18, 2))
    write_phantoms(tmp_path / "set", 2, 0, size=spec)
    with pytest.raises(InputError, match="not empty"):
        write_phantoms(tmp_path / "set", 1, 0, size=spec)
    manifest = write_phantoms(tmp_path / "set", 1, 0, size=spec, overwrite=True)
    assert len(manifest["files"]) == 4
    assert len(list((tmp_path / "set").rglob("*.nii.gz"))) == 4  # the second run's stale subjects are gone


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="unknown phantom size"):
        get_spec("huge")
    with pytest.raises(ConfigError, match="field of view"):
        get_spec(dataclasses.replace(TINY, lr_shape=(20, 18, 16)))
    assert get_spec("paper").factor == pytest.approx((0.15 / 0.018,) * 2)
    assert isinstance(get_spec("small"), PhantomSpec)


def test_cli_help_and_refusal_of_a_non_empty_directory(tmp_path):
    runner = CliRunner()
    result = runner.invoke(command, ["--help"])
    assert result.exit_code == 0 and "--subjects" in result.output and "--overwrite" in result.output
    (tmp_path / "notes.txt").write_text("keep me")
    result = runner.invoke(command, [str(tmp_path), "--subjects", "1"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and str(tmp_path) in lines[0]
    assert "Traceback" not in result.output
    assert (tmp_path / "notes.txt").read_text() == "keep me" and not (tmp_path / "lr").exists()


def test_cli_writes_the_small_set(tmp_path):
    out = tmp_path / "phantoms"
    result = CliRunner().invoke(command, [str(out), "--subjects", "1", "--seed", "2"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["size"] == "small" and manifest["seed"] == 2 and len(manifest["files"]) == 4
    hr = nib.load(str(out / "test" / "hr" / "sub-002_microct.nii.gz"))
    assert hr.shape == (192, 192, 48)
    assert "manifest.json" in result.output  # progress went to stderr (mixed into output by CliRunner)
