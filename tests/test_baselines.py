"""The supervised baselines of the paper's comparison (U-Net, SRGAN): their generators, losses and
training step, and `microsr-tf train --method`, `predict` and `export` end to end on phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
import yaml
from click.testing import CliRunner
from scipy.ndimage import gaussian_filter

from microsr_tf.cli.main import cli
from microsr_tf.config import Config
from microsr_tf.degradation import Degradation
from microsr_tf.export import load_model
from microsr_tf.inference.mc import MonteCarloPredictor
from microsr_tf.models.artifact import load_generator, save_generator
from microsr_tf.models.cyclegan import float32_generator
from microsr_tf.models.srgan import SRResNetGenerator
from microsr_tf.models.unet import UNetGenerator
from microsr_tf.phantoms import write_phantoms
from microsr_tf.training.methods import build_method
from microsr_tf.training.trainer import latest_checkpoint

from tensorboard_events import read_events  # tests/tensorboard_events.py

METHODS = ("unet", "srgan")


def tiny_generator(method: str) -> keras.Model:
    return UNetGenerator(4) if method == "unet" else SRResNetGenerator(4, 1)


def tiny_config(method: str, **train) -> Config:
    return Config.from_dict({"data": {"patch_size": 32},
                             "model": {"method": method, "ngf": 8, "n_blocks": 2, "ndf": 4}, "train": train})


def perturb(gen: keras.Model, rng: np.random.Generator) -> None:
    """Random weights everywhere, batch-norm statistics included, so the network is not the identity."""
    gen.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) if "moving_variance" not in v.path
                     else rng.uniform(0.5, 2.0, w.shape).astype(np.float32)
                     for v, w in zip(gen.weights, gen.get_weights())])


# ----- generators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_untrained_generator_returns_its_input_at_any_multiple_of_4(method, rng):
    gen = tiny_generator(method)
    for shape in ((1, 36, 44, 1), (3, 8, 12, 1)):
        x = rng.random(shape, dtype=np.float32)
        y = gen(x).numpy()
        assert y.shape == shape
        np.testing.assert_array_equal(y, x)  # zero-initialised head: bicubic input in, bicubic out


@pytest.mark.parametrize("method", METHODS)
def test_output_is_one_channel_in_0_1_and_the_mc_interface_is_one_pass(method, rng):
    gen = tiny_generator(method)
    x = rng.random((2, 32, 32, 1), dtype=np.float32)
    gen(x)
    perturb(gen, rng)
    features = gen.deterministic_prefix(x)
    assert isinstance(features, tuple) and len(features) == 1
    y = gen(x).numpy()
    assert y.min() >= 0.0 and y.max() <= 1.0 and 0.0 < (y == 0).mean() + (y == 1).mean() < 1.0
    assert gen.stochastic_suffix(features, tf.constant([[5, 0], [5, 1]])) is features[0]
    np.testing.assert_array_equal(features[0].numpy(), y)
    result = MonteCarloPredictor(gen, samples=2, seed=1).predict(x)
    np.testing.assert_allclose(result.mean, y, atol=1e-5)  # a traced graph, so float rounding may differ
    assert not result.var.any()


@pytest.mark.parametrize("method", METHODS)
def test_output_does_not_depend_on_the_tile(method, rng):
    """No per-image normalisation: a tile's output equals the whole image's output wherever the tile
    holds the pixel's whole receptive field (batch norm runs on its moving statistics)."""
    gen = tiny_generator(method)
    x = gaussian_filter(rng.random((160, 160)), 2).astype(np.float32)[None, ..., None]
    gen(x)
    perturb(gen, rng)
    whole = gen(x).numpy()
    tile = gen(x[:, 32:128, 32:128]).numpy()
    assert whole.std() > 0.01
    np.testing.assert_allclose(tile[:, 32:64, 32:64], whole[:, 64:96, 64:96], atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_generator_archive_round_trip(method, rng, tmp_path):
    gen = tiny_generator(method)
    x = rng.random((1, 32, 32, 1), dtype=np.float32)
    gen(x)
    perturb(gen, rng)
    save_generator(gen, tmp_path / "g.keras", {"method": method})
    loaded, meta = load_generator(tmp_path / "g.keras")
    assert type(loaded) is type(gen) and meta == {"method": method}
    np.testing.assert_array_equal(loaded(x).numpy(), gen(x).numpy())


def test_default_sizes_as_documented():
    """Weight counts of the default networks, counted by hand layer by layer (kernel + bias)."""
    f = 64
    conv = lambda k, cin, cout: k * k * cin * cout + cout  # noqa: E731
    unet = (conv(3, 1, f) + conv(3, f, f) + conv(3, f, 2 * f) + conv(3, 2 * f, 2 * f)  # encoder
            + conv(3, 2 * f, 4 * f) + conv(3, 4 * f, 4 * f)  # bottleneck
            + conv(3, 4 * f, 2 * f) + conv(3, 4 * f, 2 * f) + conv(3, 2 * f, 2 * f)  # up to level 1
            + conv(3, 2 * f, f) + conv(3, 2 * f, f) + conv(3, f, f) + conv(1, f, 1))  # up to level 0, head
    bn, prelu = 4 * f, f  # gamma, beta, moving mean and variance; one slope per channel
    block = 2 * conv(3, f, f) + 2 * bn + prelu
    srresnet = conv(9, 1, f) + prelu + 9 * block + conv(3, f, f) + bn + conv(9, f, 1)
    x = tf.zeros((1, 16, 16, 1))
    for gen, count, millions in ((UNetGenerator(), unet, 2.1), (SRResNetGenerator(), srresnet, 0.7)):
        gen(x)
        assert gen.count_params() == count and round(count / 1e6, 1) == millions


# ----- losses and the training step ---------------------------------------------------------------


def test_srgan_generator_loss_is_pixel_mse_plus_a_thousandth_of_the_adversarial_log_loss():
    cfg = Config()
    assert cfg.train.srgan_adv_weight == 1e-3 and cfg.train.gan_loss == "bce"
    model = build_method(tiny_config("srgan"), 10).model
    sr = np.array([[0.2, 0.4, 0.6, 0.8], [0.0, 1.0, 0.5, 0.5]], np.float32).reshape(2, 2, 2, 1)
    hr = np.array([[0.1, 0.4, 0.9, 0.8], [0.5, 0.5, 0.5, 0.5]], np.float32).reshape(2, 2, 2, 1)
    logits = np.array([[0.3], [-1.2]], np.float32)
    losses = {k: v.numpy() for k, v in model.generator_losses(sr, hr, logits).items()}
    pixel = np.array([(0.01 + 0 + 0.09 + 0) / 4, (0.25 + 0.25 + 0 + 0) / 4])
    adv = np.log(1 + np.exp(-logits[:, 0]))  # -log sigmoid(l): the critic's output called real
    np.testing.assert_allclose(losses["pixel_loss"], pixel, rtol=1e-6)
    np.testing.assert_allclose(losses["adv_loss"], adv, rtol=1e-6)
    np.testing.assert_allclose(losses["g_loss"], pixel + 1e-3 * adv, rtol=1e-6)
    d = model.critic_loss(np.array([[2.0], [0.0]], np.float32), logits).numpy()
    np.testing.assert_allclose(d, np.log(1 + np.exp(-np.array([2.0, 0.0]))) + np.log(1 + np.exp(logits[:, 0])),
                               rtol=1e-6)

    least_squares = build_method(tiny_config("srgan", gan_loss="lsgan"), 10).model
    losses = {k: v.numpy() for k, v in least_squares.generator_losses(sr, hr, logits).items()}
    np.testing.assert_allclose(losses["g_loss"], pixel + 1e-3 * (logits[:, 0] - 1) ** 2, rtol=1e-6)
    d = least_squares.critic_loss(np.array([[2.0], [0.0]], np.float32), logits).numpy()
    np.testing.assert_allclose(d, (np.array([2.0, 0.0]) - 1) ** 2 + logits[:, 0] ** 2, rtol=1e-6)


def test_srgan_training_step_minimises_that_loss(rng):
    """The step's reported generator loss is the hand-computed objective of the networks it updates."""
    keras.utils.set_random_seed(1)
    model = build_method(tiny_config("srgan"), 10).model
    x = rng.random((3, 32, 32, 1), dtype=np.float32)
    y = rng.random((3, 32, 32, 1), dtype=np.float32)
    perturb(model.generator, rng)
    sr = model.generator(x, training=True).numpy()  # batch statistics: what the step sees
    logits = model.critic(sr, training=True).numpy()[:, 0]
    expected = ((sr - y) ** 2).mean(axis=(1, 2, 3)) + 1e-3 * np.log(1 + np.exp(-logits))
    losses = model.step(x, y)
    np.testing.assert_allclose(losses["g_loss"].numpy(), expected, rtol=1e-5)
    assert int(model.optimizer.iterations.numpy()) == 1 and int(model.d_optimizer.iterations.numpy()) == 1


def _fixed_batch(rng) -> tuple[np.ndarray, np.ndarray]:
    hr = np.stack([np.clip(gaussian_filter(rng.random((32, 32)), 1.5) * 4 - 1.5, 0, 1) for _ in range(4)])
    hr = hr[..., None].astype(np.float32)
    return Degradation((4.0, 4.0), 0.05)(hr, tf.constant([1, 2])).numpy(), hr


@pytest.mark.parametrize("method, steps, rate", [("unet", 100, 2e-3), ("srgan", 50, 1e-3)])
def test_losses_decrease_on_a_fixed_batch(method, steps, rate, rng):
    keras.utils.set_random_seed(0)
    model = build_method(tiny_config(method, learning_rate=rate), 10).model
    lr, hr = _fixed_batch(rng)
    step = tf.function(model.step)
    history = [{k: float(tf.reduce_mean(v)) for k, v in step(tf.constant(lr), tf.constant(hr)).items()}
               for _ in range(steps)]
    late = {k: np.mean([h[k] for h in history[-10:]]) for k in history[0]}
    assert late["pixel_loss"] < (0.5 if method == "unet" else 0.85) * history[0]["pixel_loss"]
    if method == "srgan":
        assert late["d_loss"] < 0.5 * history[0]["d_loss"]  # the critic learns to tell output from HR


def test_mixed_precision_trains_and_saves_a_float32_generator(rng):
    model = build_method(tiny_config("srgan", precision="mixed_bfloat16"), 10).model
    assert model.generator.compute_dtype == "bfloat16"
    lr, hr = _fixed_batch(rng)
    losses = model.step(lr, hr)
    assert all(np.isfinite(v.numpy()).all() and v.dtype == tf.float32 for v in losses.values())
    copy = float32_generator(model.generator)
    assert copy.compute_dtype == "float32"
    np.testing.assert_allclose(copy(lr).numpy(), model.generator(lr).numpy(), atol=0.02)


# ----- end to end through the command line --------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, subjects=1, seed=0, size="small")
    return root


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("method", METHODS)
def test_train_resume_predict_export_end_to_end(method, phantoms, tmp_path):
    run, out, exported = tmp_path / "run", tmp_path / "out", tmp_path / "export"
    flags = ["--patch-size", "32", "--stride", "32", "--ngf", "4", "--n-blocks", "1", "--ndf", "4",
             "--batch-size", "2", "--steps-per-epoch", "3", "--checkpoint-every", "3", "--log-every", "1",
             "--image-every", "3", "--seed", "0", "--strategy", "default"]
    code, text = _run("train", "--method", method, "--lr-dir", str(phantoms / "lr"), "--hr-dir",
                      str(phantoms / "hr"), "--out", str(run), "--epochs", "1", *flags)
    assert code == 0, text
    assert "Trained 3 steps (1 epoch)" in text and "Best epoch (mean pixel loss" in text
    assert (run / "generator_best.keras").is_file() and (run / "generator_best.meta.json").is_file()
    meta = json.loads((run / "generator.meta.json").read_text())
    assert meta["method"] == method and meta["deterministic"] is True and meta["factors"] == [8.0, 8.0]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["method"] == method and config["data"]["degradation_noise"] == 0.05

    events = read_events(run / "logs")
    tags = {tag for _, tag, _ in events}
    expected = {"step/pixel_loss", "epoch/pixel_loss", "learning_rate"}
    if method == "srgan":
        expected |= {"step/g_loss", "step/d_loss", "step/adv_loss"}
    assert expected <= tags
    assert sorted(s for s, tag, _ in events if tag == "step/pixel_loss") == [1, 2, 3]
    panels = [v for _, tag, v in events if tag == "validation/degraded|output|hr|error"]
    assert len(panels) == 1
    panel = tf.io.decode_png(panels[0][2]).numpy()
    assert panel.shape == (4 * 32, 4 * 32, 1)  # four validation rows of four 32 px columns
    assert panel[:, :32].std() > 0 and not np.array_equal(panel[:, :32], panel[:, 64:96])

    code, text = _run("train", "--out", str(run), "--resume", "--method", "cyclegan")
    assert code != 0 and text.strip().splitlines() == [
        f"Error: {run / 'config.yaml'}: model.method was '{method}' in this run and is 'cyclegan' now; that changes "
        f"what the resumed steps compute, so keep '{method}' or start a new run"]
    code, text = _run("train", "--lr-dir", str(phantoms / "lr"), "--hr-dir", str(phantoms / "hr"), "--out",
                      str(run), "--resume", "--epochs", "2")
    assert code == 0, text
    assert "Trained 6 steps (2 epochs)" in text
    assert sorted(s for s, tag, _ in read_events(run / "logs") if tag == "step/pixel_loss") == [1, 2, 3, 4, 5, 6]
    # The checkpoint holds the whole generator (batch-norm statistics too): restored, it is the saved one.
    setup = build_method(Config.from_dict(config), 3)
    checkpoint = tf.train.Checkpoint(best_cycle_loss=tf.Variable(0.0), **setup.checkpoint_objects)
    checkpoint.restore(latest_checkpoint(run)).assert_existing_objects_matched()
    saved, _ = load_generator(run)
    for restored, final in zip(setup.generator.get_weights(), saved.get_weights(), strict=True):
        np.testing.assert_array_equal(restored, final)

    scan = phantoms / "test" / "lr" / "sub-002_cbct.nii.gz"
    code, text = _run("predict", str(scan), "--model", str(run), "--out-dir", str(out), "--roi", ":,:,20:22",
                      "--samples", "10", "--std", "--seed", "1")
    assert code == 0, text
    assert f"deterministic model ({method}): one output per voxel, variance exactly 0 (T = 10 not used)" in text
    mean = nib.load(out / "sub-002_cbct_mean.nii.gz")
    assert mean.shape == (192, 192, 2) and np.isfinite(mean.get_fdata()).all() and mean.get_fdata().std() > 0
    for key in ("var", "std"):
        image = nib.load(out / f"sub-002_cbct_{key}.nii.gz")
        assert image.shape == (192, 192, 2) and not np.asarray(image.dataobj).any()
        assert image.header["descrip"].tobytes().rstrip(b"\0").decode() == \
            f"variance 0: deterministic {method} model, no MC dropout"

    code, text = _run("export", "--model", str(run), "--out", str(exported), "--samples", "7")
    assert code == 0, text
    # a baseline reads no LR scans in training: no retraining gives it LR statistics, so none is suggested
    assert f"a {method} baseline stores no LR statistics" in text and "retrain" not in text
    _, exported_meta = load_model(exported)
    assert exported_meta["deterministic"] is True and exported_meta["method"] == method
    x = np.random.default_rng(0).random((2, 36, 44, 1), dtype=np.float32)
    signatures = tf.saved_model.load(str(exported / "1")).signatures
    for result in (signatures["serving_default"](image=tf.constant(x)),
                   signatures["mc_seeded"](image=tf.constant(x), samples=tf.constant(25), seed=tf.constant(3))):
        assert not result["variance"].numpy().any()
        np.testing.assert_allclose(result["mean"].numpy(), saved(x).numpy(), atol=1e-6)
    code, text = _run("predict", str(scan), "--model", str(exported), "--out-dir", str(tmp_path / "via_export"),
                      "--roi", ":,:,20:22", "--seed", "1")
    assert code == 0, text
    via_export = nib.load(tmp_path / "via_export" / "sub-002_cbct_mean.nii.gz").get_fdata()
    np.testing.assert_allclose(via_export, mean.get_fdata(), rtol=1e-5, atol=1e-2)
    assert not np.asarray(nib.load(tmp_path / "via_export" / "sub-002_cbct_var.nii.gz").dataobj).any()


def test_patch_size_that_bends_the_factor_is_refused_before_any_run_dir(phantoms, tmp_path):
    # 36 px at 8x: round(4.5) = 4 LR px, so the pairs would be made at 9x while the scans are 8x.
    run = tmp_path / "run"
    code, text = _run("train", "--method", "unet", "--lr-dir", str(phantoms / "lr"), "--hr-dir", str(phantoms / "hr"),
                      "--out", str(run), "--patch-size", "36", "--stride", "36", "--ngf", "4", "--batch-size", "2",
                      "--strategy", "default", "--seed", "0")
    assert code == 1 and text.strip().splitlines() == [
        "Error: data.patch_size 36 gives an LR grid of 4 px, i.e. a factor of 9.00 where the data's is 8.00 "
        "(12% off); a network trained so would not super-resolve at the data's factor: use a patch size such as "
        "32 or 40"]
    assert not run.exists()
