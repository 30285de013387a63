"""SavedModel export: versioned layout, graphs the stock server runs, the signatures against independent
computations (the local Monte Carlo engine, local ``predict`` on a NIfTI), batching, and loading back."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from tensorflow.core.protobuf import saved_model_pb2

from microsr_tf.cli.main import cli
from microsr_tf.errors import InputError
from microsr_tf.export import MAX_SAMPLES, META_FILE, export_saved_model, load_model
from microsr_tf.inference.mc import MonteCarloPredictor
from microsr_tf.inference.predict import slice_seed
from microsr_tf.models.artifact import save_generator
from microsr_tf.models.generator import ResnetGenerator
from microsr_tf.models.dropout import image_seeds
from serving_fixture import META, save_tiny_generator  # tests/serving_fixture.py


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One export per dropout position, made when first asked for. A tiny memory budget makes the
    server-side loop run its passes in several chunks."""
    made = {}

    def get(position: str):
        if position not in made:
            tmp = tmp_path_factory.mktemp(position)
            gen = save_tiny_generator(tmp / "g.keras", n_blocks=2, dropout_position=position)
            made[position] = gen, tmp, export_saved_model(tmp / "g.keras", tmp / "export", samples=6,
                                                          memory_budget_mb=0.05)
        return made[position]

    return get


@pytest.fixture(scope="module")
def exported(exports):
    return exports("bottleneck")


@pytest.fixture(scope="module", params=["bottleneck", "resblocks"])
def exported_each(request, exports):
    return exports(request.param)


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(str(exported[2]))


def _must_compile(graph_def) -> list[str]:
    """Functions and nodes anywhere in ``graph_def`` (its library included) marked ``_XlaMustCompile``."""
    functions = list(graph_def.library.function)
    marked = [f.signature.name for f in functions if "_XlaMustCompile" in f.attr]
    marked += [n.name for n in graph_def.node if "_XlaMustCompile" in n.attr]
    return marked + [f"{f.signature.name}/{n.name}" for f in functions for n in f.node_def
                     if "_XlaMustCompile" in n.attr]


def test_layout_is_versioned_with_metadata(exported):
    _, tmp, version_dir = exported
    assert version_dir == tmp / "export" / "1"
    assert (version_dir / "saved_model.pb").is_file()
    meta = json.loads((version_dir / "assets.extra" / META_FILE).read_text())
    assert meta["factors"] == [4.0, 4.0] and meta["default_samples"] == 6 and meta["max_samples"] == MAX_SAMPLES
    assert meta["signatures"] == ["serving_default", "mc_seeded", "mc_scanner", "metadata"]
    assert meta["tensorflow_version"] == tf.__version__
    assert [p.name for p in (tmp / "export").iterdir()] == ["1"]  # no temporary directory left
    assert export_saved_model(tmp / "g.keras", tmp / "export", samples=2).name == "2"


def test_exported_graph_has_no_function_that_must_be_compiled(exported_each):
    """The stock tensorflow_model_server compiles no XLA on CPU unless started with a flag."""
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((exported_each[2] / "saved_model.pb").read_bytes())
    assert len(saved.meta_graphs) == 1 and len(saved.meta_graphs[0].graph_def.library.function) > 10
    assert _must_compile(saved.meta_graphs[0].graph_def) == []
    # and the check finds the attribute where it is: the same generator traced with its XLA kernels
    gen = exported_each[0]
    gen.xla_kernels = True
    fn = tf.function(lambda t, r: gen(t, seed=r)).get_concrete_function(
        tf.TensorSpec([None, None, None, 1]), tf.TensorSpec([None, 2], tf.int32))
    assert _must_compile(fn.graph.as_graph_def())


def test_seeded_signature_matches_the_monte_carlo_engine(exported_each):
    gen, _, version_dir = exported_each
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    sig = tf.saved_model.load(str(version_dir)).signatures["mc_seeded"]
    out = sig(image=tf.constant(x), samples=tf.constant(6), seed=tf.constant(11))
    ref = MonteCarloPredictor(gen, samples=6).predict(x, seed=11)  # one base seed: the shared convention
    np.testing.assert_allclose(out["mean"].numpy(), ref.mean, atol=1e-5)
    np.testing.assert_allclose(out["variance"].numpy(), ref.var, atol=1e-6)
    assert float(out["variance"].numpy().max()) > 0


def test_requests_merged_into_one_batch_get_what_they_get_alone(exported, loaded):
    """TF-Serving's batcher concatenates requests along the first dimension: per-image samples and seeds."""
    sig = loaded.signatures["mc_seeded"]
    x = np.random.default_rng(1).random((3, 16, 16, 1), dtype=np.float32)
    merged = sig(image=tf.constant(x), samples=tf.constant([5, 2, 3]), seed=tf.constant([7, 8, 9]))
    for b, (t, s) in enumerate([(5, 7), (2, 8), (3, 9)]):
        alone = sig(image=tf.constant(x[b:b + 1]), samples=tf.constant(t), seed=tf.constant(s))
        # the same masks and sample counts: equal up to float32 rounding, which differs between a batch of
        # three and a batch of one (other convolution kernels; seen once: 1.1e-6 on a mean of 0.5)
        np.testing.assert_allclose(merged["mean"].numpy()[b], alone["mean"].numpy()[0], atol=1e-5)
        np.testing.assert_allclose(merged["variance"].numpy()[b], alone["variance"].numpy()[0], atol=1e-5)
    # a scalar base seed follows image_seeds, as the local engine
    base = sig(image=tf.constant(x), samples=tf.constant(3), seed=tf.constant(4))
    rows = sig(image=tf.constant(x), samples=tf.constant([3, 3, 3]), seed=tf.constant(image_seeds(4, 3)))
    np.testing.assert_allclose(base["mean"].numpy(), rows["mean"].numpy(), atol=1e-6)


def test_default_signature_is_stochastic_per_request(loaded):
    sig = loaded.signatures["serving_default"]
    x = tf.constant(np.random.default_rng(4).random((1, 32, 32, 1), dtype=np.float32))  # not constant:
    a, b = sig(image=x), sig(image=x)  # an untrained net maps a constant image to a constant
    assert set(a) == {"mean", "variance"}
    assert not np.array_equal(a["mean"].numpy(), b["mean"].numpy())


def test_two_fresh_loads_draw_different_random_sequences(exported):
    """Each load of the export (a server restart) seeds unseeded requests afresh, in both runtimes."""
    x = np.random.default_rng(5).random((1, 16, 16, 1), dtype=np.float32)
    draws = []
    for _ in range(2):
        sig = tf.saved_model.load(str(exported[2])).signatures["serving_default"]
        draws += [sig(image=tf.constant(x))["mean"].numpy() for _ in range(2)]
    for _ in range(2):  # the C++ session path TF-Serving uses
        graph = tf.Graph()
        with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
            meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(exported[2]))
            sig = meta_graph.signature_def["serving_default"]
            run = session.make_callable(graph.get_tensor_by_name(sig.outputs["mean"].name),
                                        feed_list=[graph.get_tensor_by_name(sig.inputs["image"].name)])
            draws += [run(x) for _ in range(2)]
    for i in range(len(draws)):
        for j in range(i):
            assert not np.array_equal(draws[i], draws[j]), (i, j)


def test_scanner_signature_equals_local_predict_on_a_nifti_volume(tmp_path, exported, loaded):
    """LR slices in scanner units -> HR units, as `predict --normalize model --stitch whole` writes them.

    The spacing 0.41 mm gives a non-integer factor (4.1) and HR sizes that are not multiples of 4.
    """
    _, tmp, _ = exported
    rng = np.random.default_rng(3)
    lr = rng.normal(50.0, 10.0, (9, 11, 3)).astype(np.float32)
    lr[2:6, 3:8] += 45.0
    affine = np.diag([0.41, 0.41, 1.0, 1.0])
    nib.save(nib.Nifti1Image(lr, affine), tmp_path / "scan.nii.gz")
    seed = 21
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "scan.nii.gz"), "--model", str(tmp / "g.keras"),
                                      "--out-dir", str(tmp_path / "out"), "--samples", "4", "--seed", str(seed),
                                      "--normalize", "model", "--stitch", "whole", "--std"])
    assert result.exit_code == 0, result.output
    local = {k: nib.load(tmp_path / "out" / f"scan_{k}.nii.gz").get_fdata() for k in ("mean", "var", "std")}
    assert local["mean"].shape == (37, 45, 3)
    sig = loaded.signatures["mc_scanner"]
    scale = 20.0 * 5.0  # HR units per normalised unit: std * (high - low)
    for k in range(lr.shape[2]):
        out = sig(lr_image=tf.constant(lr[None, :, :, k, None]), spacing=tf.constant([0.41, 0.41]),
                  samples=tf.constant(4), seed=tf.constant(slice_seed(seed, k)))
        np.testing.assert_allclose(out["mean"].numpy()[0, ..., 0], local["mean"][..., k], atol=1e-5 * scale)
        np.testing.assert_allclose(out["variance"].numpy()[0, ..., 0], local["var"][..., k], atol=1e-5 * scale**2)
        np.testing.assert_allclose(out["std"].numpy()[0, ..., 0], local["std"][..., k], atol=1e-5 * scale)
    assert local["var"].max() > 0


def test_scanner_signature_refuses_a_spacing_the_model_was_not_trained_for(loaded):
    lr = tf.constant(np.full((1, 8, 8, 1), 50.0, np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="trained for factors"):
        loaded.signatures["mc_scanner"](lr_image=lr, spacing=tf.constant([0.2, 0.4]), samples=tf.constant(2),
                                        seed=tf.constant(0))


def test_a_model_without_lr_statistics_is_exported_without_the_scanner_signature(tmp_path):
    meta = {k: v for k, v in META.items() if k != "lr_stats"}
    save_tiny_generator(tmp_path / "g.keras", meta)
    result = CliRunner().invoke(cli, ["export", "--model", str(tmp_path / "g.keras"), "--out", str(tmp_path / "m"),
                                      "--samples", "2"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "mc_scanner" in notes[0] and "lr_stats" in notes[0]
    signatures = tf.saved_model.load(str(tmp_path / "m" / "1")).signatures
    assert set(signatures) == {"serving_default", "mc_seeded", "metadata"}


def test_load_model_gives_the_generator_with_its_fast_kernels(exported):
    gen, tmp, _ = exported
    loaded_gen, meta = load_model(tmp / "export")  # base path: the highest version is used
    assert meta["hr_spacing"] == [0.1, 0.1]
    assert isinstance(loaded_gen, ResnetGenerator) and loaded_gen.xla_kernels  # not the plain serving graphs
    x = np.random.default_rng(1).random((1, 32, 32, 1), dtype=np.float32)
    via_export = MonteCarloPredictor(loaded_gen, samples=4, seed=3).predict(x)
    via_keras = MonteCarloPredictor(gen, samples=4, seed=3).predict(x)
    np.testing.assert_allclose(via_export.mean, via_keras.mean, atol=1e-5)
    np.testing.assert_allclose(via_export.var, via_keras.var, atol=1e-6)


def test_exporting_an_export_says_it_already_is_one(exported):
    _, tmp, version_dir = exported
    runner = CliRunner()
    for path in (version_dir, tmp / "export"):
        result = runner.invoke(cli, ["export", "--model", str(path), "--out", str(tmp / "again")])
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "is already an exported SavedModel" in lines[0] and str(path) in lines[0]
    assert not (tmp / "again").exists()


def test_bad_exports_are_refused(tmp_path, exported):
    _, tmp, version_dir = exported
    with pytest.raises(InputError, match="already exists"):
        export_saved_model(tmp / "g.keras", tmp / "export", version=1)
    for samples in (1, MAX_SAMPLES + 1):
        with pytest.raises(InputError, match=rf"samples must be an integer in \[2, {MAX_SAMPLES}\]"):
            export_saved_model(tmp / "g.keras", tmp_path / "x", samples=samples)
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
    save_generator(gen, tmp_path / "h.keras", {**META, "lr_stats": {"mean": 1.0}})
    with pytest.raises(InputError, match="lr_stats is unusable"):
        export_saved_model(tmp_path / "h.keras", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_export_into_a_file_is_refused(tmp_path, exported):
    _, tmp, _ = exported
    (tmp_path / "taken").write_text("")
    with pytest.raises(InputError, match="exists and is not a directory"):
        export_saved_model(tmp / "g.keras", tmp_path / "taken")


def test_cli_export_then_predict_with_the_savedmodel(tmp_path, exported):
    _, tmp, _ = exported
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "--model", str(tmp / "g.keras"), "--out", str(tmp_path / "m"),
                                 "--samples", "3"])
    assert result.exit_code == 0, result.output
    assert "note:" not in result.output  # the model stores lr_stats: all signatures exported
    lr = np.random.default_rng(2).normal(100, 20, (8, 8, 2)).astype(np.float32)
    lr[2:6, 2:6] += 200
    nib.save(nib.Nifti1Image(lr, np.diag([0.4, 0.4, 1.0, 1.0])), tmp_path / "scan.nii.gz")
    result = runner.invoke(cli, ["predict", str(tmp_path / "scan.nii.gz"), "--model", str(tmp_path / "m"),
                                 "--out-dir", str(tmp_path / "out"), "--samples", "3", "--seed", "1"])
    assert result.exit_code == 0, result.output
    mean = nib.load(tmp_path / "out" / "scan_mean.nii.gz")
    assert mean.shape == (32, 32, 2)
    np.testing.assert_allclose(mean.header.get_zooms(), (0.1, 0.1, 1.0), rtol=1e-6)


@pytest.mark.parametrize("extra", [["--samples", "1001"], ["--version", str(2**63)], ["--memory-budget-mb", "nan"],
                                   ["--memory-budget-mb", "inf"]])
def test_out_of_range_export_options_are_usage_errors(tmp_path, extra):
    result = CliRunner().invoke(cli, ["export", "--model", str(tmp_path / "g.keras"), "--out", str(tmp_path / "m"),
                                      *extra])
    assert result.exit_code == 2 and extra[0] in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "m").exists()
