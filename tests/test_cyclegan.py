"""CycleGAN step: finite outputs and losses, distributed loss scaling, image pool, lr schedule,
mixed bfloat16 precision."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from microsr_tf.config import ModelConfig, TrainConfig
from microsr_tf.errors import ConfigError
from microsr_tf.models.cyclegan import (STEP_PREFIX, ImagePool, LinearDecay, build_cyclegan, float32_generator,
                                       make_optimizer, step_seed_rows)
from microsr_tf.training.strategy import check_batch_size

P = 32
TINY = ModelConfig(ngf=4, n_blocks=1, ndf=4, n_layers_d=2)


def _data(rng, n=8):
    return rng.random((n, P, P, 1), dtype=np.float32), rng.random((n, P, P, 1), dtype=np.float32)


def test_fit_tiny_outputs_and_losses_finite(rng):
    tc = TrainConfig(batch_size=2, gan_loss="lsgan", pool_size=3, lambda_identity=0.5)
    keras.utils.set_random_seed(0)
    model = build_cyclegan(TINY, tc, P)
    model.compile(make_optimizer(tc, 3, "g"), make_optimizer(tc, 3, "d"))
    x, y = _data(rng)
    out = model.g_l(x)
    assert out.shape == x.shape and np.all(np.isfinite(out)) and 0.0 <= float(tf.reduce_min(out))
    assert float(tf.reduce_max(out)) <= 1.0
    before = [w.numpy().copy() for w in model.g_l.trainable_weights]
    history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(2), epochs=2,
                        steps_per_epoch=3, shuffle=False, verbose=0).history
    for name in ("g_loss", "d_loss", "cycle_loss", "adv_loss", "identity_loss", STEP_PREFIX + "g_loss"):
        assert len(history[name]) == 2 and all(math.isfinite(v) for v in history[name]), name
    assert int(model.optimizer.iterations) == 6 and int(model.d_optimizer.iterations) == 6
    assert any(not np.allclose(a, b.numpy()) for a, b in zip(before, model.g_l.trainable_weights))
    assert np.all(np.isfinite(model.g_l(x)))
    assert int(model.pool_h.count.numpy()) == 3


def _one_sgd_step(strategy, weights, x, y):
    tc = TrainConfig(batch_size=len(x), pool_size=4, seed=5)  # a filling pool passes fakes through
    cfg = ModelConfig(ngf=4, n_blocks=1, ndf=4, n_layers_d=2, dropout_position="bottleneck")
    with strategy.scope():
        model = build_cyclegan(cfg, tc, P)
        model.set_weights(weights)
        model.compile(keras.optimizers.SGD(0.5), keras.optimizers.SGD(0.5))
    logs = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)), epochs=1, steps_per_epoch=1,
                     shuffle=False, verbose=0).history
    pool_counts = [int(v.numpy()) for v in getattr(model.pool_l.count, "values", [model.pool_l.count])]
    return model.get_weights(), logs, pool_counts


def test_mirrored_two_replicas_match_one_device(rng, two_cpus):
    """Dropout on: each example's masks depend on its place in the global batch, not on the replica."""
    keras.utils.set_random_seed(3)
    tc = TrainConfig(batch_size=4)
    init = build_cyclegan(ModelConfig(ngf=4, n_blocks=1, ndf=4, n_layers_d=2), tc, P)
    assert len(init.get_weights()) > 20
    weights = init.get_weights()
    x, y = _data(rng, 4)
    single, single_logs, single_pool = _one_sgd_step(tf.distribute.get_strategy(), weights, x, y)
    mirrored, mirrored_logs, mirrored_pool = _one_sgd_step(tf.distribute.MirroredStrategy(two_cpus), weights, x, y)
    assert single_pool == [4] and mirrored_pool == [2, 2]  # each replica keeps its own history
    assert max(np.abs(a - b).max() for a, b in zip(weights, single)) > 1e-4  # the step did move weights
    for a, b in zip(single, mirrored):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    for name in ("g_loss", "d_loss", "cycle_loss"):
        assert single_logs[name][0] == pytest.approx(mirrored_logs[name][0], abs=1e-6)


def test_batch_not_divisible_by_replicas(two_cpus):
    strategy = tf.distribute.MirroredStrategy(two_cpus)
    with pytest.raises(ConfigError, match="not divisible by the 2 replicas"):
        check_batch_size(3, strategy)
    check_batch_size(4, strategy)


def test_image_pool_fills_then_swaps_where_the_coin_says():
    pool = ImagePool(3, (1, 1, 1))
    query = tf.function(pool.query)
    fakes = lambda *v: np.array(v, np.float32).reshape(-1, 1, 1, 1)  # noqa: E731
    heads = np.zeros(2, np.float32)
    # filling: two, then one more and one over the size -- all pass through, the first three are kept
    np.testing.assert_array_equal(query(fakes(1, 2), heads, [0, 0]), fakes(1, 2))
    np.testing.assert_array_equal(query(fakes(3, 4), heads, [0, 0]), fakes(3, 4))
    assert int(pool.count.numpy()) == 3
    np.testing.assert_array_equal(pool.images.numpy()[:3, 0, 0, 0], [1, 2, 3])
    # full: coin < 0.5 swaps the fake for stored image `pick`, which the fake replaces
    out = query(fakes(7, 8), np.array([0.2, 0.9], np.float32), [1, 0])
    np.testing.assert_array_equal(out[:, 0, 0, 0], [2, 8])
    np.testing.assert_array_equal(pool.images.numpy()[:3, 0, 0, 0], [1, 7, 3])
    out = query(fakes(9, 10), np.array([0.0, 0.4], np.float32), [2, 1])
    np.testing.assert_array_equal(out[:, 0, 0, 0], [3, 7])
    np.testing.assert_array_equal(pool.images.numpy()[:3, 0, 0, 0], [1, 10, 9])


def test_step_draws_depend_only_on_seed_step_and_place_in_the_global_batch():
    rows = step_seed_rows(7, tf.constant(3, tf.int64), 2, tf.constant(6), tf.constant(0), tf.constant(6)).numpy()
    assert rows.shape == (2, 6, 2) and rows.dtype == np.int32 and len(np.unique(rows.reshape(-1, 2), axis=0)) == 12
    again = step_seed_rows(7, tf.constant(3, tf.int64), 2, tf.constant(6), tf.constant(2), tf.constant(2)).numpy()
    np.testing.assert_array_equal(again, rows[:, 2:4])  # a replica holding examples 2..3 gets their rows
    other = step_seed_rows(7, tf.constant(4, tf.int64), 2, tf.constant(6), tf.constant(0), tf.constant(6)).numpy()
    assert not np.array_equal(other, rows)


def test_linear_decay_schedule_follows_step_counter():
    tc = TrainConfig(epochs=4, decay_start_epoch=2, learning_rate=1e-3)
    opt = make_optimizer(tc, steps_per_epoch=10, name="g")
    schedule = opt._learning_rate
    assert isinstance(schedule, LinearDecay)
    assert float(schedule(0)) == pytest.approx(1e-3) and float(schedule(20)) == pytest.approx(1e-3)
    assert float(schedule(30)) == pytest.approx(5e-4) and float(schedule(40)) == pytest.approx(0.0)
    opt.build([keras.Variable(np.zeros(2, np.float32))])
    opt.iterations.assign(35)
    assert float(opt.learning_rate) == pytest.approx(2.5e-4)
    assert LinearDecay.from_config(schedule.get_config()).get_config() == schedule.get_config()


def test_mixed_bfloat16_fit_keeps_float32_weights_and_global_policy(rng):
    tc = TrainConfig(batch_size=2, precision="mixed_bfloat16", pool_size=2)
    keras.utils.set_random_seed(0)
    model = build_cyclegan(TINY, tc, P)
    assert keras.config.dtype_policy().name == "float32"
    assert model.g_l.compute_dtype == "bfloat16" and model.d_h.compute_dtype == "bfloat16"
    model.compile(make_optimizer(tc, 3, "g"), make_optimizer(tc, 3, "d"))
    x, y = _data(rng)
    before = [w.numpy().copy() for w in model.g_l.trainable_weights]
    history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(2), epochs=1,
                        steps_per_epoch=3, shuffle=False, verbose=0).history
    for name in ("g_loss", "d_loss", "cycle_loss", "adv_loss"):
        assert all(math.isfinite(v) for v in history[name]), name
    assert {v.dtype for v in model.weights} == {"float32"}
    assert any(not np.allclose(a, b.numpy()) for a, b in zip(before, model.g_l.trainable_weights))
    assert keras.config.dtype_policy().name == "float32"

    saved = float32_generator(model.g_l)  # what the trainer writes to generator.keras
    assert saved is not model.g_l and saved.compute_dtype == "float32"
    assert all(layer.dtype_policy.name == "float32" for layer in saved._flatten_layers())
    seed = tf.constant([[1, 2], [3, 4]], tf.int32)
    bf16, f32 = model.g_l(x[:2], seed=seed).numpy(), saved(x[:2], seed=seed).numpy()
    assert f32.dtype == np.float32 and 0 < np.abs(bf16 - f32).max() < 0.05  # same weights, bf16 rounding only
    plain = build_cyclegan(TINY, TrainConfig(batch_size=2), P).g_l
    assert float32_generator(plain) is plain


def test_bad_precision_refused():
    with pytest.raises(ConfigError, match="train.precision must be one of"):
        TrainConfig(precision="float16").validate()


# ----- the objective, computed a second way -----------------------------------------------------

def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _deterministic_model(gan_loss="bce", pool_size=0, lambda_identity=0.0, lambdas=(10.0, 1.0), seed=0):
    """A tiny CycleGAN without dropout (its outputs do not depend on seed rows), weights from ``seed``."""
    tc = TrainConfig(batch_size=3, gan_loss=gan_loss, pool_size=pool_size, lambda_identity=lambda_identity,
                     lambda_rec=lambdas[0], lambda_adv=lambdas[1])
    keras.utils.set_random_seed(seed)
    return build_cyclegan(ModelConfig(ngf=2, n_blocks=1, ndf=2, n_layers_d=1, dropout_position="none"), tc, 16), tc


@pytest.mark.parametrize("gan_loss, lambda_identity", [("bce", 0.0), ("lsgan", 0.5)])
def test_step_losses_equal_the_paper_objective_computed_by_hand(rng, gan_loss, lambda_identity):
    """Eq. 1-3 in numpy from the networks' outputs: cycle L1 (both directions), the generators' GAN loss
    against "real", each critic's half real/fake loss, and the identity term; per example."""
    model, tc = _deterministic_model(gan_loss, lambda_identity=lambda_identity, lambdas=(7.0, 0.3))
    model.compile(keras.optimizers.SGD(0.0), keras.optimizers.SGD(0.0))
    x, y = (rng.random((3, 16, 16, 1), dtype=np.float32) for _ in range(2))
    g_l, g_h = (lambda a: model.g_l(a).numpy()), (lambda a: model.g_h(a).numpy())
    d_l, d_h = (lambda a: model.d_l(a).numpy().astype(np.float64)), (lambda a: model.d_h(a).numpy().astype(np.float64))
    if gan_loss == "bce":  # log loss with logits z: -log sigmoid(z) for "real", -log(1 - sigmoid(z)) for "fake"
        real, fake = (lambda z: _softplus(-z)), (lambda z: _softplus(z))
    else:
        real, fake = (lambda z: (z - 1.0) ** 2), (lambda z: z ** 2)
    mean = lambda a: a.reshape(len(a), -1).mean(axis=1)  # noqa: E731
    fake_hr, fake_lr = g_l(x), g_h(y)
    cycle = mean(np.abs(x - g_h(fake_hr))) + mean(np.abs(y - g_l(fake_lr)))
    adv = mean(real(d_h(fake_hr))) + mean(real(d_l(fake_lr)))
    identity = mean(np.abs(g_l(y) - y)) + mean(np.abs(g_h(x) - x))
    expected = {
        "cycle_loss": cycle, "adv_loss": adv,
        "g_loss": 0.3 * adv + 7.0 * cycle + 7.0 * lambda_identity * identity,
        "d_h_loss": 0.5 * (mean(real(d_h(y))) + mean(fake(d_h(fake_hr)))),
        "d_l_loss": 0.5 * (mean(real(d_l(x))) + mean(fake(d_l(fake_lr)))),
    }
    expected["d_loss"] = expected["d_h_loss"] + expected["d_l_loss"]
    if lambda_identity:
        expected["identity_loss"] = identity
    losses = model.step(tf.constant(x), tf.constant(y))
    assert set(losses) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(losses[name].numpy(), value, rtol=2e-5, atol=1e-6, err_msg=name)


def _alternating_update(model, x, y):
    """The textbook CycleGAN update, written out: generators first (critics fixed), then the critics on
    the fakes made before the generator update, with the critics' weights from before it too."""
    with tf.GradientTape() as tape:
        fake_hr, fake_lr = model.g_l(x), model.g_h(y)
        cycle = (tf.reduce_mean(tf.abs(x - model.g_h(fake_hr)), axis=[1, 2, 3])
                 + tf.reduce_mean(tf.abs(y - model.g_l(fake_lr)), axis=[1, 2, 3]))
        bce = lambda logits, label: tf.reduce_mean(  # noqa: E731
            tf.nn.sigmoid_cross_entropy_with_logits(tf.fill(tf.shape(logits), label), logits), axis=[1, 2, 3])
        adv = bce(model.d_h(fake_hr), 1.0) + bce(model.d_l(fake_lr), 1.0)
        g_loss = tf.reduce_mean(model.lambda_adv * adv + model.lambda_rec * cycle)
    g_vars = model.generator_variables
    g_grads = tape.gradient(g_loss, g_vars)
    fakes = (tf.stop_gradient(fake_hr), tf.stop_gradient(fake_lr))
    with tf.GradientTape() as tape:
        d_loss = tf.reduce_mean(0.5 * (bce(model.d_h(y), 1.0) + bce(model.d_h(fakes[0]), 0.0))
                                + 0.5 * (bce(model.d_l(x), 1.0) + bce(model.d_l(fakes[1]), 0.0)))
    d_vars = model.critic_variables
    d_grads = tape.gradient(d_loss, d_vars)
    model.optimizer.apply_gradients(zip(g_grads, g_vars))
    model.d_optimizer.apply_gradients(zip(d_grads, d_vars))


@pytest.mark.parametrize("pool_size", [0, 8])
def test_fused_step_equals_the_alternating_update(rng, pool_size):
    """Two Adam steps of the fused train step against the written-out alternating update on a twin
    with the same weights (a pool that is still filling passes the fakes through unchanged)."""
    fused, tc = _deterministic_model(pool_size=pool_size)
    twin, _ = _deterministic_model(pool_size=pool_size)
    twin.set_weights(fused.get_weights())
    for model in (fused, twin):
        model.compile(make_optimizer(tc, 10, "g"), make_optimizer(tc, 10, "d"))
    for _ in range(2):
        x, y = (tf.constant(rng.random((3, 16, 16, 1), dtype=np.float32)) for _ in range(2))
        fused.step(x, y)
        _alternating_update(twin, x, y)
    moved = max(np.abs(a - b).max() for a, b in zip(fused.get_weights(), _deterministic_model()[0].get_weights()))
    assert moved > 1e-5
    for a, b in zip(fused.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)


def test_critic_gradients_never_reach_the_generators(rng):
    """With every generator loss weight at 0 a step must leave both generators untouched while the
    critics learn: any critic gradient applied to a generator weight would move it."""
    model, _ = _deterministic_model(lambdas=(0.0, 0.0))
    model.compile(keras.optimizers.SGD(1.0), keras.optimizers.SGD(1.0))
    g_before = [v.numpy().copy() for v in model.generator_variables]
    d_before = [v.numpy().copy() for v in model.critic_variables]
    x, y = (tf.constant(rng.random((3, 16, 16, 1), dtype=np.float32)) for _ in range(2))
    losses = model.step(x, y)
    assert float(tf.reduce_mean(losses["d_loss"])) > 0.1
    assert max(np.abs(a - v.numpy()).max() for a, v in zip(d_before, model.critic_variables)) > 1e-4
    for a, v in zip(g_before, model.generator_variables):
        np.testing.assert_array_equal(a, v.numpy())


# ----- the critic's leaky ReLU --------------------------------------------------------------------

def test_leaky_relu_equals_keras_in_values_and_gradients(rng):
    from microsr_tf.models.discriminator import LeakyReLU

    x = tf.constant(rng.normal(size=(2, 5, 5, 3)).astype(np.float32))
    ours, keras_layer = LeakyReLU(0.2), keras.layers.LeakyReLU(negative_slope=0.2)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        a, b = ours(x), keras_layer(x)
        loss_a, loss_b = tf.reduce_sum(a * x), tf.reduce_sum(b * x)
    np.testing.assert_allclose(a, np.where(x > 0, x, 0.2 * x.numpy()), rtol=1e-7)
    np.testing.assert_allclose(a, b, rtol=1e-7)
    np.testing.assert_allclose(tape.gradient(loss_a, x), tape.gradient(loss_b, x), rtol=1e-6)


REMAPPER = '''
import sys
import keras
import numpy as np
import tensorflow as tf
from microsr_tf.config import ModelConfig, TrainConfig
from microsr_tf.models import discriminator
from microsr_tf.models.cyclegan import build_cyclegan, make_optimizer

def one_step():
    tc = TrainConfig(batch_size=2)
    model = build_cyclegan(ModelConfig(ngf=4, n_blocks=1, ndf=4, n_layers_d=2), tc, 32)
    model.compile(make_optimizer(tc, 1, "g"), make_optimizer(tc, 1, "d"))
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    model.fit(tf.data.Dataset.from_tensors((x, x)).repeat(), epochs=1, steps_per_epoch=1, verbose=0)

one_step()
print("=== with keras.layers.LeakyReLU ===", file=sys.stderr, flush=True)
discriminator.LeakyReLU = lambda slope: keras.layers.LeakyReLU(negative_slope=slope)
one_step()
'''


def test_a_training_step_prints_no_remapper_error():
    """Grappler's remapper fused Conv2D + BiasAdd + LeakyRelu and then failed on the gradient, printing
    "remapper failed ... LeakyReluGrad" on every run; the control shows the check would see it."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "1"}
    done = subprocess.run([sys.executable, "-c", REMAPPER], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, control = done.stderr.split("=== with keras.layers.LeakyReLU ===")
    assert "remapper failed" in control and "LeakyReluGrad" in control
    assert "remapper failed" not in ours


def test_lr_inconsistency_is_one_minus_the_correlation_of_area_averages():
    from microsr_tf.models.cyclegan import area_operators, lr_inconsistency

    rng = np.random.default_rng(0)
    a = rng.random((2, 8, 8, 1)).astype(np.float32)
    b = rng.random((2, 8, 8, 1)).astype(np.float32)
    area = area_operators(8, (4.0, 4.0))
    got = lr_inconsistency(tf.constant(a), tf.constant(b), area).numpy()
    for i in range(2):  # by hand: mean of each 4x4 block, then Pearson's r of the four block means
        da = a[i, :, :, 0].reshape(2, 4, 2, 4).mean(axis=(1, 3)).ravel()
        db = b[i, :, :, 0].reshape(2, 4, 2, 4).mean(axis=(1, 3)).ravel()
        assert got[i] == pytest.approx(1.0 - np.corrcoef(da, db)[0, 1], abs=1e-5)
    # any gain and offset is forgiven; an inverted image is the worst case
    same = lr_inconsistency(tf.constant(a), tf.constant(3.0 * a + 0.5), area).numpy()
    np.testing.assert_allclose(same, 0.0, atol=1e-5)
    np.testing.assert_allclose(lr_inconsistency(tf.constant(a), tf.constant(-a), area).numpy(), 2.0, atol=1e-5)
    # a fractional factor (0.15 / 0.018 mm) averages exact footprints and stays differentiable
    x = tf.Variable(a)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(lr_inconsistency(x, tf.constant(b), area_operators(8, (8.33, 8.33))[:1] * 2))
    assert tape.gradient(loss, x) is not None


def test_lr_consistency_weight_enters_the_generator_loss():
    tc = TrainConfig(batch_size=2, lambda_lr_consistency=2.0)
    model = build_cyclegan(TINY, tc, P, factors=(4.0, 4.0))
    model.compile(keras.optimizers.Adam(0.0), keras.optimizers.Adam(0.0))  # no update: losses of the same weights
    rng = np.random.default_rng(1)
    x = tf.constant(rng.random((2, P, P, 1)).astype(np.float32))
    y = tf.constant(rng.random((2, P, P, 1)).astype(np.float32))
    keras.utils.set_random_seed(3)
    losses = model.step(x, y)
    assert [int(m.shape[0]) for m in model.lr_area] == [P // 4, P // 4]
    expected = losses["adv_loss"] + 10.0 * losses["cycle_loss"] + 2.0 * losses["lr_consistency_loss"]
    np.testing.assert_allclose(losses["g_loss"], expected, rtol=1e-5)
    assert float(tf.reduce_min(losses["lr_consistency_loss"])) > 0.0


def test_lattice_amplitude_is_the_windowed_spectrum_at_the_metric_peaks():
    from microsr_tf.evaluation.periodic import _lattice_bins
    from microsr_tf.models.cyclegan import lattice_amplitude, lattice_basis

    rng = np.random.default_rng(4)
    u = rng.random((3, 16, 16, 1)).astype(np.float32)
    got = lattice_amplitude(tf.constant(u), lattice_basis(16)).numpy()
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(16) / 16)  # periodic Hann
    window = np.outer(hann, hann)
    period2, period4 = _lattice_bins(16, 16)
    for i in range(3):  # numpy's FFT of the windowed patch at the evaluation's 15 peak frequencies
        spectrum = np.fft.fft2(u[i, :, :, 0] * window) / window.sum()
        assert got[i] == pytest.approx(sum(abs(spectrum[k]) for k in period2 + period4), rel=1e-4)
    # a flat patch has none, nor has a smooth ramp; a checkerboard of amplitude a has all of it at (1/2, 1/2)
    assert lattice_amplitude(tf.fill([1, 16, 16, 1], 0.7), lattice_basis(16)).numpy()[0] < 1e-4
    ramp = np.cos(2 * np.pi * np.arange(16) / 16)[None, :, None] * np.ones((1, 16, 16, 1))
    assert lattice_amplitude(tf.constant(ramp, tf.float32), lattice_basis(16)).numpy()[0] < 1e-4
    checker = 0.1 * (-1.0) ** np.add.outer(np.arange(16), np.arange(16))
    amp = lattice_amplitude(tf.constant(checker[None, :, :, None], tf.float32), lattice_basis(16)).numpy()[0]
    assert amp == pytest.approx(0.1, abs=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        lattice_basis(18)


def test_periodic_weight_enters_the_generator_loss():
    tc = TrainConfig(batch_size=2, lambda_periodic=3.0)
    model = build_cyclegan(TINY, tc, P)
    model.compile(keras.optimizers.Adam(0.0), keras.optimizers.Adam(0.0))
    rng = np.random.default_rng(1)
    x = tf.constant(rng.random((2, P, P, 1)).astype(np.float32))
    y = tf.constant(rng.random((2, P, P, 1)).astype(np.float32))
    losses = model.step(x, y)
    expected = losses["adv_loss"] + 10.0 * losses["cycle_loss"] + 3.0 * losses["periodic_loss"]
    np.testing.assert_allclose(losses["g_loss"], expected, rtol=1e-5)
    assert float(tf.reduce_min(losses["periodic_loss"])) > 0.0
    assert "periodic_loss" not in build_cyclegan(TINY, TrainConfig(batch_size=2), P).trackers
