"""Synthetic temporal-bone phantoms: layout, pairing, headers, image quality per domain, anatomy, scanner
profiles (each documented parameter measured on what is rendered), CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage, optimize, special

from microsr_tf.cli.phantom import command
from microsr_tf.errors import ConfigError, InputError
from microsr_tf.phantoms import (AIR, BONE, CAPSULE, PROFILES, SIZES, SOFT, TRAIN_PROFILES, PhantomSpec,
                                 ScannerProfile, cbct_forward, generate_subject, get_spec, lr_render_grid,
                                 parse_profiles, render_hr, render_lr, scan_rngs, write_phantoms)
from microsr_tf.volumes import resampled_affine

# The small size's 11.5 mm field of view on coarser grids, so a whole data set renders in about a second.
TINY = dataclasses.replace(SIZES["small"], name="tiny", hr_shape=(144, 144, 16), hr_spacing=(0.08, 0.08, 0.08),
                           lr_shape=(18, 18, 16), lr_spacing=(0.64, 0.64, 0.08))
FWHM = 2 * math.sqrt(2 * math.log(2))  # FWHM of a Gaussian per standard deviation
STANDARD = PROFILES["cbct-standard"].draw(np.random.default_rng(0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms") / "set"
    manifest = write_phantoms(out, subjects=2, seed=11, size=TINY, lr_profiles="train", test_profiles="all")
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
    assert sorted(roles) == sorted(["test_hr", "test_lr", "train_hr", "train_hr", "train_lr", "train_lr"]
                                   + ["test_lr_profile"] * len(PROFILES))
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert on_disk == sorted(f["path"] for f in manifest["files"])
    folders = {"train_lr": "lr", "train_hr": "hr", "test_lr": "test/lr", "test_hr": "test/hr"}
    for f in manifest["files"]:
        folder = f"test/lr-{f['profile']}" if f["role"] == "test_lr_profile" else folders[f["role"]]
        assert f["path"].rsplit("/", 1)[0] == folder
        assert f["path"].rsplit("/", 1)[1] == f"{f['subject']}_{f['modality']}.nii.gz"
        img, _ = _load(out / f["path"])
        assert list(img.shape) == f["shape"]
        assert f["spacing"] == list(TINY.lr_spacing if f["modality"] == "cbct" else TINY.hr_spacing)
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
    lr_noise = _noise(lambda rng: render_lr(subject, TINY, rng, STANDARD), 1000.0 * STANDARD["gain"])
    assert 0.005 < hr_noise < 0.03 and 0.02 < lr_noise < 0.1
    assert hr_noise < 0.5 * lr_noise


def test_hr_edges_are_sharp_and_lr_is_blurred_beyond_its_voxels(subject):
    quiet = dataclasses.replace(TINY, hr_noise=0.0)
    hr = render_hr(subject, quiet) / subject["hr_calibration"]["gain"]
    lr = render_lr(subject, quiet, np.random.default_rng(0), dict(STANDARD, noise_hu=0.0)) / (1000.0 * STANDARD["gain"])

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
    runs = {name: write_phantoms(tmp_path / name, 1, seed, size=spec, test_profiles="cbct-scatter")
            for name, seed in (("a", 3), ("b", 3), ("c", 4))}
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
    write_phantoms(tmp_path / "set", 2, 0, size=spec, test_profiles="all")
    with pytest.raises(InputError, match="not empty"):
        write_phantoms(tmp_path / "set", 1, 0, size=spec)
    manifest = write_phantoms(tmp_path / "set", 1, 0, size=spec, overwrite=True, test_profiles="cbct-scatter")
    assert len(manifest["files"]) == 5
    on_disk = sorted(p.relative_to(tmp_path / "set").as_posix() for p in (tmp_path / "set").rglob("*.nii.gz"))
    assert on_disk == sorted(f["path"] for f in manifest["files"])  # the first run's stale files are gone
    assert sorted(p.name for p in (tmp_path / "set" / "test").iterdir()) == ["hr", "lr", "lr-cbct-scatter"]


def test_bad_sizes_and_profiles_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown phantom size"):
        get_spec("huge")
    with pytest.raises(ConfigError, match="field of view"):
        get_spec(dataclasses.replace(TINY, lr_shape=(20, 18, 16)))
    with pytest.raises(ConfigError, match="unknown scanner profile 'cbct-x'"):
        get_spec(dataclasses.replace(TINY, lr_profiles=("cbct-x",)))
    assert get_spec("paper").factor == pytest.approx((0.15 / 0.018,) * 2)
    assert isinstance(get_spec("small"), PhantomSpec)
    for bad, match in ((dict(psf_fwhm=(1.5, 1.2)), "psf_fwhm range"), (dict(noise_filter="box"), "noise_filter"),
                       (dict(halo_fraction=(0.1, 0.2), halo_fwhm=(1.0, 1.5)), "halo_fwhm"),
                       (dict(views=4), "views"), (dict(gain=(0.0, 1.0)), "gain")):
        with pytest.raises(ConfigError, match=match):
            ScannerProfile("odd", "", **bad).validate()
    assert [p.name for p in parse_profiles("train")] == list(TRAIN_PROFILES)
    assert [p.name for p in parse_profiles("held-out")] == ["cbct-scatter"]
    assert parse_profiles("none") == () and len(parse_profiles("all")) == len(PROFILES)
    for bad, match in (({"lr_profiles": "cbct-standard,nope"}, "--lr-profiles: unknown scanner profile 'nope'"),
                       ({"lr_profiles": "none"}, "--lr-profiles: at least one"),
                       ({"test_profiles": "cbct-smooth,cbct-smooth"}, "given twice"),
                       ({"test_profiles": "cbct-smooth,"}, "empty profile name")):
        with pytest.raises(ConfigError, match=match):
            write_phantoms(tmp_path / "never", 1, 0, size=TINY, **bad)
    assert not (tmp_path / "never").exists()  # refused before anything is written


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
    assert manifest["size"] == "small" and manifest["seed"] == 2 and len(manifest["files"]) == 4 + len(PROFILES)
    for name in PROFILES:  # by default the command scans the test subject with every profile
        assert (out / "test" / f"lr-{name}" / "sub-002_cbct.nii.gz").is_file()
    hr = nib.load(str(out / "test" / "hr" / "sub-002_microct.nii.gz"))
    assert hr.shape == (192, 192, 48)
    assert manifest["lr_profiles"] == ["cbct-standard"]  # the size's own profile, as the bundled model saw
    assert "manifest.json" in result.output  # progress went to stderr (mixed into output by CliRunner)


def test_cli_profile_options(tmp_path):
    spec_args = ["--subjects", "2", "--size", "small", "--seed", "1"]
    result = CliRunner().invoke(command, [str(tmp_path / "a"), "--lr-profiles", "cbct-lowdose,nope"] + spec_args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--lr-profiles" in lines[0] and "nope" in lines[0]
    assert not (tmp_path / "a").exists()
    assert "cbct-scatter (held out)" in " ".join(CliRunner().invoke(command, ["--help"]).output.split())


# --------------------------------------------------------------------------------------------------
# Scanner profiles: each documented parameter measured on a known object through the forward model.


def _measure_spec(n: int, nz: int, supersample: int = 4) -> PhantomSpec:
    """A bare LR grid of n x n x nz voxels at the adult size's spacings (0.48 mm in-plane, 0.06 mm slices)."""
    return PhantomSpec("measure", (8 * n, 8 * n, nz), (0.06, 0.06, 0.06), (n, n, nz), (0.48, 0.48, 0.06),
                       supersample=supersample)


def _only(scanner: dict, *keep: str) -> dict:
    """The scan with every additive artefact switched off except ``keep``."""
    off = {"noise_hu": 0.0, "beam_hardening": 0.0, "cupping_hu": 0.0, "ring_hu": 0.0}
    return dict(scanner, **{k: v for k, v in off.items() if k not in keep})


def _forward(spec, scanner, attenuation, seed=1):
    """Render ``attenuation(x, y, z)`` (world mm, broadcast) through the CBCT forward model."""
    grid, _ = lr_render_grid(spec, scanner)
    mu = np.broadcast_to(attenuation(grid.x[:, None, None], grid.y[None, :, None], grid.z[None, None, :]),
                         (len(grid.x), len(grid.y), len(grid.z)))
    return cbct_forward(np.ascontiguousarray(mu, dtype=np.float32), spec, scanner, np.random.default_rng(seed))


def _lr_centres(spec):
    (nx, ny, nz), (dx, dy, dz) = spec.lr_shape, spec.lr_spacing
    return [(np.arange(n) + 0.5) * d - n * d / 2 for n, d in ((nx, dx), (ny, dy), (nz, dz))]


def _step(x):
    """Gaussian edge spread with unit standard deviation."""
    return 0.5 * (1 + special.erf(x / math.sqrt(2)))


def _draws(profile: ScannerProfile, n: int = 2):
    return [profile.draw(np.random.default_rng([7, i])) for i in range(n)]


@pytest.mark.parametrize("name", list(PROFILES))
def test_psf_width_and_shape_measured_on_a_slanted_edge(name):
    """Edge spread of a bone/soft-tissue half-plane tilted by 8 degrees (oversampled by the tilt).

    Expected: a Gaussian core of the drawn FWHM convolved with the LR voxel (a unit box, variance
    1/12 voxel^2), plus, for a halo profile, the halo's share spread by its own Gaussian.
    """
    spec = _measure_spec(40, 2)
    normal = np.array([math.cos(math.radians(8)), math.sin(math.radians(8))])
    h = spec.lr_spacing[0] / spec.supersample  # antialiasing ramp of one sample, inside the voxel's 1/12
    x, y, _ = _lr_centres(spec)
    dist = (x[:, None] * normal[0] + y[None, :] * normal[1]) / spec.lr_spacing[0]  # LR voxels
    near = np.abs(dist) < 16
    for scanner in _draws(PROFILES[name]):
        lr = _forward(spec, _only(scanner), lambda X, Y, Z: SOFT + (BONE - SOFT) * np.clip(
            0.5 + (X * normal[0] + Y * normal[1]) / h, 0, 1))[:, :, 0]
        soft = scanner["offset_hu"]
        esf = (lr - soft) / (scanner["gain"] * 1000 * (BONE - SOFT))  # 0 in soft tissue, 1 in bone
        d, e = dist[near], esf[near]
        if scanner["halo_fraction"] > 0:
            model = lambda t, f, s1, s2: (1 - f) * _step(t / s1) + f * _step(t / s2)  # noqa: E731
            (frac, s_core, s_halo), _ = optimize.curve_fit(model, d, e, p0=[0.1, 0.7, 3.0])
            assert frac == pytest.approx(scanner["halo_fraction"], abs=0.01)
            assert math.sqrt(s_halo**2 - 1 / 12) * FWHM == pytest.approx(scanner["halo_fwhm"], rel=0.05)
        else:
            (s_core,), _ = optimize.curve_fit(lambda t, s: _step(t / s), d, e, p0=[0.7])
            assert np.abs(_step(d / s_core) - e).max() < 0.02  # one Gaussian explains the edge: no halo
        measured = math.sqrt(s_core**2 - 1 / 12) * FWHM
        assert measured == pytest.approx(scanner["psf_fwhm"], rel=0.03)
        lo, hi = PROFILES[name].psf_fwhm
        assert 0.97 * lo <= measured <= 1.03 * hi


@pytest.mark.parametrize("name", list(PROFILES))
def test_slice_thickness_measured_on_an_edge_across_the_slices(name):
    spec = _measure_spec(4, 96)
    dz = spec.lr_spacing[2]
    _, _, z = _lr_centres(spec)
    for scanner in _draws(PROFILES[name]):
        lr = _forward(spec, _only(scanner), lambda X, Y, Z: SOFT + (BONE - SOFT) * np.clip(0.5 + Z / dz, 0, 1))
        esf = (lr[2, 2] - scanner["offset_hu"]) / (scanner["gain"] * 1000 * (BONE - SOFT))
        (sigma,), _ = optimize.curve_fit(lambda t, s: _step(t / s), z, esf, p0=[0.3])
        measured = math.sqrt(sigma**2 - dz**2 / 12) * FWHM / spec.lr_spacing[0]  # in LR in-plane voxels
        assert measured == pytest.approx(scanner["slice_fwhm"], rel=0.03)


def _fbp_nps_centroid(noise_filter: str) -> float:
    """Mean radial frequency (cycles/voxel) of filtered back-projection noise, NPS(rho) ~ rho W(rho)^2.

    Parallel-beam FBP of white sinogram noise has a noise power spectrum proportional to the ramp times
    the squared apodisation window W (Kak & Slaney, ch. 5); windows as documented for skimage's iradon.
    """
    rho = np.linspace(0.0, 0.5, 20001)
    window = {"ramp": np.ones_like(rho), "shepp-logan": np.sinc(rho), "cosine": np.cos(np.pi * rho),
              "hamming": 0.54 + 0.46 * np.cos(2 * np.pi * rho), "hann": np.cos(np.pi * rho) ** 2}[noise_filter]
    power_per_ring = rho * window**2 * rho  # NPS times the ring's circumference
    return float((rho * power_per_ring).sum() / power_per_ring.sum())


def _nps_centroid(noise: np.ndarray) -> float:
    power = (np.abs(np.fft.fft2(noise - noise.mean(), axes=(0, 1))) ** 2).mean(axis=2)
    f0, f1 = np.fft.fftfreq(noise.shape[0]), np.fft.fftfreq(noise.shape[1])
    return float((np.hypot(f0[:, None], f1[None, :]) * power).sum() / power.sum())


@pytest.mark.parametrize("name", list(PROFILES))
def test_noise_level_in_a_uniform_region_and_its_fbp_texture(name):
    spec = _measure_spec(32, 16, supersample=2)
    for scanner in _draws(PROFILES[name]):
        lr = _forward(spec, _only(scanner, "noise_hu"), lambda X, Y, Z: np.float32(SOFT))
        assert lr.mean() == pytest.approx(scanner["offset_hu"], abs=3.0)  # noise adds no bias
        centre, corner = lr[10:22, 10:22], lr[:8, :8]  # centre of the field and a corner region
        assert centre.std() == pytest.approx(scanner["noise_hu"], rel=0.08)
        assert corner.std() == pytest.approx(scanner["noise_hu"], rel=0.12)
        assert _nps_centroid(lr) == pytest.approx(_fbp_nps_centroid(scanner["noise_filter"]), rel=0.1)


@pytest.mark.parametrize("name", list(PROFILES))
def test_calibration_from_known_materials_and_cupping_on_a_water_bath(name):
    spec = _measure_spec(24, 8, supersample=2)
    materials = np.array([AIR, SOFT, BONE, CAPSULE])
    for scanner in _draws(PROFILES[name]):
        quiet = dict(_only(scanner, "noise_hu"), halo_fraction=0.0)
        means = [_forward(spec, quiet, lambda X, Y, Z, m=m: np.float32(m)).mean() for m in materials]
        slope, intercept = np.polyfit(1000 * (materials - 1), means, 1)
        assert slope == pytest.approx(scanner["gain"], rel=0.005)
        assert intercept == pytest.approx(scanner["offset_hu"], abs=2.0)
        assert np.abs(np.polyval([slope, intercept], 1000 * (materials - 1)) - means).max() < 2.0  # linear
        # cupping: a bowl over the field of view, lowest at the centre, as documented
        water = _forward(spec, _only(scanner, "cupping_hu"), lambda X, Y, Z: np.float32(SOFT))[:, :, 0]
        x, y, _ = _lr_centres(spec)
        r2 = (x[:, None] ** 2 + y[None, :] ** 2) / (spec.fov[0] / 2) ** 2
        inside = r2 < 1
        (edge, bowl), *_ = np.linalg.lstsq(np.stack([np.ones(inside.sum()), 1 - r2[inside]], 1), water[inside],
                                           rcond=None)
        # HU are rounded to integers: a bowl shallower than 1 HU becomes a step, which a bowl fits with a
        # depth of up to 6 u (1 - u) <= 1.5 HU (u uniform in 1 - r^2 over the disc)
        assert -bowl == pytest.approx(scanner["cupping_hu"], abs=1.6)
        assert edge == pytest.approx(scanner["offset_hu"], abs=1.0)


def _streak_depth(spec, scanner) -> float:
    """How much darker water reads between two dense rods than beside them (noise and cupping off)."""
    rods = lambda X, Y, Z: np.where(np.minimum(np.hypot(X - 2.4, Y), np.hypot(X + 2.4, Y)) < 1.0,  # noqa: E731
                                    np.float32(CAPSULE), np.float32(SOFT))
    lr = _forward(spec, _only(scanner, "beam_hardening"), rods)
    x, y, _ = _lr_centres(spec)
    between = (np.abs(x)[:, None] < 0.5) & (np.abs(y)[None, :] < 0.5)
    beside = (np.abs(x)[:, None] < 0.5) & (np.abs(np.abs(y)[None, :] - 2.4) < 0.5)
    return float(lr[beside].mean() - lr[between].mean()) / scanner["gain"]


def test_beam_hardening_darkens_water_between_dense_rods():
    spec = _measure_spec(24, 2, supersample=2)
    scanner = dict(STANDARD, psf_fwhm=1.5, halo_fraction=0.0)
    assert abs(_streak_depth(spec, dict(scanner, beam_hardening=0.0))) < 1.0  # streaks come only from beta
    depth = {name: [_streak_depth(spec, dict(scanner, beam_hardening=b)) for b in p.beam_hardening]
             for name, p in PROFILES.items()}
    for lo, hi in depth.values():
        assert 0 < lo <= hi  # dark between the rods, deeper for a larger beta
    held_out_lo = min(depth[name][0] for name, p in PROFILES.items() if p.held_out)
    assert held_out_lo > 1.2 * max(depth[name][1] for name in TRAIN_PROFILES)


def test_rings_are_concentric_with_the_documented_amplitude():
    spec = _measure_spec(24, 2, supersample=2)
    for name, profile in PROFILES.items():
        for scanner in _draws(profile):
            water = _forward(spec, _only(scanner, "ring_hu"), lambda X, Y, Z: np.float32(SOFT))[:, :, 0]
            deviation = water - scanner["offset_hu"]
            if profile.ring_hu[1] == 0:
                assert np.abs(deviation).max() <= 0.5  # only rounding to integral HU
                continue
            assert scanner["ring_hu"] * 0.85 <= np.abs(deviation).max() <= scanner["ring_hu"] + 0.5
            # concentric: the four mirror images of a voxel, at the same radius, read the same
            np.testing.assert_allclose(deviation, deviation[::-1, :], atol=0.5)
            np.testing.assert_allclose(deviation, deviation[:, ::-1], atol=0.5)
            np.testing.assert_allclose(deviation, deviation.T, atol=0.5)


def test_held_out_profile_differs_from_the_training_ones_in_its_documented_ways():
    held_out = [p for p in PROFILES.values() if p.held_out]
    training = [PROFILES[name] for name in TRAIN_PROFILES]
    assert held_out and len(training) >= 2
    for profile in held_out:
        assert "held out" in profile.description
        assert profile.psf_shape == "gaussian+halo" and all(p.psf_shape == "gaussian" for p in training)
        assert profile.noise_filter not in {p.noise_filter for p in training}
        # ranges that do not overlap any training range: thinner slices; stronger beam hardening, cupping
        # and rings; a calibration (gain and offset) outside the training one
        for key, side in (("slice_fwhm", "below"), ("beam_hardening", "above"), ("cupping_hu", "above"),
                          ("ring_hu", "above"), ("gain", "above"), ("offset_hu", "above"),
                          ("halo_fraction", "above")):
            lo, hi = getattr(profile, key)
            if side == "above":
                assert lo > max(getattr(p, key)[1] for p in training), key
            else:
                assert hi < min(getattr(p, key)[0] for p in training), key
        # its noise is measurably grainier (a higher noise-power centroid) than every training profile's
        assert _fbp_nps_centroid(profile.noise_filter) > max(_fbp_nps_centroid(p.noise_filter) for p in training)


# --------------------------------------------------------------------------------------------------
# Scans in a written data set


def test_manifest_names_the_profile_and_parameters_that_made_each_scan(dataset):
    out, manifest = dataset
    assert manifest["lr_profiles"] == list(TRAIN_PROFILES) and manifest["test_profiles"] == list(PROFILES)
    lr_files = [f for f in manifest["files"] if f["modality"] == "cbct"]
    for f in lr_files:
        profile = PROFILES[f["profile"]]
        assert f["held_out"] == profile.held_out and f["in_training"] == (f["profile"] in TRAIN_PROFILES)
        assert manifest["profiles"][f["profile"]]["held_out"] == profile.held_out
        for key in ScannerProfile.RANGES:
            lo, hi = getattr(profile, key)
            assert lo <= f["scanner"][key] <= hi, (f["path"], key)
        # re-rendering from the manifest's parameters gives the file, voxel for voxel
        index = int(f["subject"].split("-")[1])
        subject = generate_subject(np.random.default_rng([manifest["seed"], index]), TINY)
        again = render_lr(subject, TINY, scan_rngs(manifest["seed"], index, f["profile"])[1], f["scanner"])
        np.testing.assert_array_equal(_load(out / f["path"])[1], again)
    # training subjects take the training profiles in turn; the test subject's own scan is its profile's
    train = sorted((f for f in lr_files if f["role"] == "train_lr"), key=lambda f: f["subject"])
    assert [f["profile"] for f in train] == list(TRAIN_PROFILES[:2])
    (own,) = [f for f in lr_files if f["role"] == "test_lr"]
    (same,) = [f for f in lr_files if f["role"] == "test_lr_profile" and f["profile"] == own["profile"]]
    assert own["scanner"] == same["scanner"]
    np.testing.assert_array_equal(_load(out / own["path"])[1], _load(out / same["path"])[1])
    for f in manifest["files"]:
        if f["modality"] == "microct":
            assert f["profile"] == "micro-ct"


def test_test_subject_under_every_profile_is_aligned_with_its_hr_twin(dataset):
    out, manifest = dataset
    (hr_file,) = [f for f in manifest["files"] if f["role"] == "test_hr"]
    hr_img, hr = _load(out / hr_file["path"])
    coarse = hr.reshape(18, 8, 18, 8, 16).mean(axis=(1, 3))
    scans = [f for f in manifest["files"] if f["role"] in ("test_lr", "test_lr_profile")]
    assert sorted(f["profile"] for f in scans if f["role"] == "test_lr_profile") == sorted(PROFILES)
    for f in scans:
        img, lr = _load(out / f["path"])
        assert f["subject"] == hr_file["subject"] and img.shape == (18, 18, 16)
        # the HR grid is the LR grid refined 8x in-plane, edge-aligned (the library's own resampling rule)
        np.testing.assert_allclose(resampled_affine(img.affine, -1, (8, 8)), hr_img.affine, atol=1e-6)

        def corr(dx, dy, dz=0):
            a = coarse[2:-2, 2:-2, 2:-2]
            b = np.roll(lr, (dx, dy, dz), axis=(0, 1, 2))[2:-2, 2:-2, 2:-2]
            return np.corrcoef(a.ravel(), b.ravel())[0, 1]

        centred = corr(0, 0)
        assert centred > 0.8, f["profile"]
        assert all(centred > corr(dx, dy) + 0.05 for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))), f["profile"]
        assert centred > corr(0, 0, 3) and centred > corr(0, 0, -3)


def test_adult_size_keeps_the_voxel_sizes_and_holds_the_adult_anatomy():
    spec = get_spec("adult")
    small = get_spec("small")
    assert spec.hr_spacing == small.hr_spacing and spec.lr_spacing == small.lr_spacing  # 0.06 / 0.48 mm
    assert spec.factor == (8.0, 8.0) and spec.anatomy_scale == 1.0
    assert spec.fov[0] >= 2 * small.fov[0] - 1e-9 and spec.hr_shape[0] <= 512  # a CPU-sized slice
    assert spec.lr_profiles == TRAIN_PROFILES and spec.slab_shift == 1.0
    # Sample the labyrinth and ossicles of several subjects on a 0.35 mm lattice: all of it lies in the
    # in-plane field of view, the slab of slices cuts the labyrinth, and at 0.48 mm the cochlea spans
    # 14+ LR voxels and the basal turn's canal 2.5+ (the small size: about 9 and 1.5).
    half = spec.fov[0] / 2
    c = np.arange(-14.0, 14.0, 0.35)
    for seed in range(3):
        subject = generate_subject(np.random.default_rng([seed, 0]), spec)
        shapes = subject["labyrinth"] + subject["ossicles"]
        inside = np.min([sh.sdf(c[:, None, None], c[None, :, None], c[None, None, :]) for sh in shapes], axis=0) < 0
        i, j, k = np.nonzero(inside)
        assert max(np.abs(c[i]).max(), np.abs(c[j]).max()) < half - 0.5
        assert (np.abs(c[k]) < spec.fov[2] / 2).any()
        coch = subject["cochlea"]
        assert 2 * (coch.r0 + coch.radial) / spec.lr_spacing[0] > 14
        assert 2 * coch.radial / spec.lr_spacing[0] > 2.5


def test_readme_profile_table_matches_the_profiles():
    """The README's table of scanner profiles states the ranges the code draws from."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    rows = {m.group(1): [c.strip() for c in m.group(2).split("|")]
            for m in re.finditer(r"^\| `(cbct-[a-z]+)` \|(.*)\|$", readme, flags=re.M)}
    assert sorted(rows) == sorted(PROFILES)

    def numbers(cell):
        return [float(v.replace("\u2212", "-")) for v in re.findall(r"\u2212?\d+(?:\.\d+)?", cell)]

    def span(rng):
        return [rng[0]] if rng[0] == rng[1] else list(rng)

    for name, cells in rows.items():
        p = PROFILES[name]
        use, core, halo, thick, noise, filt, views, beta, cup, gain, offset, rings = cells
        assert use == ("held out" if p.held_out else "train")
        assert numbers(core) == span(p.psf_fwhm) and numbers(thick) == span(p.slice_fwhm)
        assert numbers(halo) == ([] if p.halo_fraction[1] == 0 else [*span(p.halo_fraction), *span(p.halo_fwhm)])
        assert numbers(noise) == span(p.noise_hu) and filt == p.noise_filter and numbers(views) == [p.views]
        assert numbers(beta) == span(p.beam_hardening) and numbers(cup) == span(p.cupping_hu)
        assert numbers(gain) == span(p.gain) and numbers(offset) == span(p.offset_hu)
        assert numbers(rings) == ([] if p.ring_hu[1] == 0 else span(p.ring_hu))
