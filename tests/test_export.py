"""SavedModel export: versioned layout, mean/variance signatures, and loading back for predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from microsr_tf.errors import InputError
from microsr_tf.export import META_FILE, export_saved_model, load_model
from microsr_tf.inference.mc import MonteCarloPredictor
from microsr_tf.models.artifact import save_generator
from microsr_tf.models.generator import ResnetGenerator

META = {"format": 1, "hr_spacing": [0.1, 0.1], "lr_spacing": [0.4, 0.4], "factors": [4.0, 4.0],
        "hr_stats": {"mean": 100.0, "std": 20.0, "low": -2.0, "high": 3.0},
        "model": {"ngf": 4, "n_blocks": 1}, "patch_size": 32, "axis": -1}


@pytest.fixture(scope="module", params=["bottleneck", "resblocks"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    gen = ResnetGenerator(ngf=4, n_blocks=2, dropout_position=request.param)
    gen(tf.zeros([1, 32, 32, 1]))
    save_generator(gen, tmp / "g.keras", META)
    version_dir = export_saved_model(tmp / "g.keras", tmp / "export", samples=6, chunk=4)
    return gen, tmp, version_dir


def test_layout_is_versioned_with_metadata(exported):
    _, tmp, version_dir = exported
    assert version_dir == tmp / "export" / "1"
    assert (version_dir / "saved_model.pb").is_file()
    meta = json.loads((version_dir / "assets.extra" / META_FILE).read_text())
    assert meta["factors"] == [4.0, 4.0] and meta["default_samples"] == 6
    assert [p.name for p in (tmp / "export").iterdir()] == ["1"]  # no temporary directory left
    assert export_saved_model(tmp / "g.keras", tmp / "export", samples=2).name == "2"


def test_seeded_signature_matches_the_monte_carlo_engine(exported):
    gen, _, version_dir = exported
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    sig = tf.saved_model.load(str(version_dir)).signatures["mc_seeded"]
    out = sig(image=tf.constant(x), samples=tf.constant(6), seed=tf.constant(11))
    ref = MonteCarloPredictor(gen, samples=6).predict(x, seed=11)  # one base seed: the shared convention
    np.testing.assert_allclose(out["mean"].numpy(), ref.mean, atol=1e-5)
    np.testing.assert_allclose(out["variance"].numpy(), ref.var, atol=1e-6)
    assert float(out["variance"].numpy().max()) > 0


def test_default_signature_is_stochastic_per_request(exported):
    _, _, version_dir = exported
    sig = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    x = tf.constant(np.full((1, 32, 32, 1), 0.5, np.float32))
    a, b = sig(image=x), sig(image=x)
    assert set(a) == {"mean", "variance"}
    assert not np.array_equal(a["mean"].numpy(), b["mean"].numpy())


def test_load_model_gives_the_generator_interface(exported):
    gen, tmp, _ = exported
    loaded, meta = load_model(tmp / "export")  # base path: the highest version is used
    assert meta["hr_spacing"] == [0.1, 0.1]
    x = np.random.default_rng(1).random((1, 32, 32, 1), dtype=np.float32)
    via_export = MonteCarloPredictor(loaded, samples=4, seed=3).predict(x)
    via_keras = MonteCarloPredictor(gen, samples=4, seed=3).predict(x)
    np.testing.assert_allclose(via_export.mean, via_keras.mean, atol=1e-5)
    np.testing.assert_allclose(via_export.var, via_keras.var, atol=1e-6)


def test_bad_exports_are_refused(tmp_path, exported):
    _, tmp, version_dir = exported
    with pytest.raises(InputError, match="already exists"):
        export_saved_model(tmp / "g.keras", tmp / "export", version=1)
    broken = tmp_path / "7"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    (broken / "assets.extra").mkdir()
    (broken / "assets.extra" / META_FILE).write_text(json.dumps(META))
    with pytest.raises(InputError, match="cannot load SavedModel"):
        load_model(broken)
    (broken / "assets.extra" / META_FILE).unlink()
    with pytest.raises(InputError, match="not a microsr-tf export"):
        load_model(broken)


def test_unusable_metadata_is_refused_before_export_and_predict(tmp_path, exported):
    gen, _, _ = exported
    save_generator(gen, tmp_path / "g.keras", {**META, "hr_spacing": "abc"})
    for call in (lambda: load_model(tmp_path / "g.keras"),
                 lambda: export_saved_model(tmp_path / "g.keras", tmp_path / "export")):
        with pytest.raises(InputError) as info:
            call()
        assert info.value.path == str(tmp_path / "g.meta.json")
        assert "hr_spacing must be two positive numbers" in info.value.problem
    assert not (tmp_path / "export").exists()


def test_export_into_a_file_is_refused(tmp_path, exported):
    _, tmp, _ = exported
    (tmp_path / "taken").write_text("")
    with pytest.raises(InputError, match="exists and is not a directory"):
        export_saved_model(tmp / "g.keras", tmp_path / "taken")


def test_cli_export_then_predict_with_the_savedmodel(tmp_path, exported):
    import nibabel as nib
    from click.testing import CliRunner

    from microsr_tf.cli.main import cli

    _, tmp, _ = exported
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "--model", str(tmp / "g.keras"), "--out", str(tmp_path / "m"),
                                 "--samples", "3"])
    assert result.exit_code == 0, result.output
    lr = np.random.default_rng(2).normal(100, 20, (8, 8, 2)).astype(np.float32)
    lr[2:6, 2:6] += 200
    nib.save(nib.Nifti1Image(lr, np.diag([0.4, 0.4, 1.0, 1.0])), tmp_path / "scan.nii.gz")
    result = runner.invoke(cli, ["predict", str(tmp_path / "scan.nii.gz"), "--model", str(tmp_path / "m"),
                                 "--out-dir", str(tmp_path / "out"), "--samples", "3", "--seed", "1"])
    assert result.exit_code == 0, result.output
    mean = nib.load(tmp_path / "out" / "scan_mean.nii.gz")
    assert mean.shape == (32, 32, 2)
    np.testing.assert_allclose(mean.header.get_zooms(), (0.1, 0.1, 1.0), rtol=1e-6)
