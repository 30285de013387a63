"""CycleGAN step: finite outputs and losses, distributed loss scaling, image pool, lr schedule,
mixed bfloat16 precision."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from microsr_tf.config import ModelConfig, TrainConfig
from microsr_tf.errors import ConfigError
from microsr_tf.models.cyclegan import (STEP_PREFIX, ImagePool, LinearDecay, build_cyclegan, float32_generator,
                                       make_optimizer)
from microsr_tf.training.strategy import check_batch_size

P = 32
TINY = ModelConfig(ngf=4, n_blocks=1, ndf=4, n_layers_d=2)


def _data(rng, n=8):
    return rng.random((n, P, P, 1), dtype=np.float32), rng.random((n, P, P, 1), dtype=np.float32)


def _two_cpus() -> list[str]:
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        pytest.skip("needs the two logical CPU devices set up in conftest.py")
    return [d.name for d in cpus[:2]]


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
    tc = TrainConfig(batch_size=len(x), pool_size=4)  # a filling pool passes fakes through: deterministic
    cfg = ModelConfig(ngf=4, n_blocks=1, ndf=4, n_layers_d=2, dropout_position="none")
    with strategy.scope():
        model = build_cyclegan(cfg, tc, P)
        model.set_weights(weights)
        model.compile(keras.optimizers.SGD(0.5), keras.optimizers.SGD(0.5))
    logs = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)), epochs=1, steps_per_epoch=1,
                     shuffle=False, verbose=0).history
    pool_counts = [int(v.numpy()) for v in getattr(model.pool_l.count, "values", [model.pool_l.count])]
    return model.get_weights(), logs, pool_counts


def test_mirrored_two_replicas_match_one_device(rng):
    devices = _two_cpus()
    keras.utils.set_random_seed(3)
    tc = TrainConfig(batch_size=4)
    init = build_cyclegan(ModelConfig(ngf=4, n_blocks=1, ndf=4, n_layers_d=2, dropout_position="none"), tc, P)
    assert len(init.get_weights()) > 20
    weights = init.get_weights()
    x, y = _data(rng, 4)
    single, single_logs, single_pool = _one_sgd_step(tf.distribute.get_strategy(), weights, x, y)
    mirrored, mirrored_logs, mirrored_pool = _one_sgd_step(tf.distribute.MirroredStrategy(devices), weights, x, y)
    assert single_pool == [4] and mirrored_pool == [2, 2]  # each replica keeps its own history
    assert max(np.abs(a - b).max() for a, b in zip(weights, single)) > 1e-4  # the step did move weights
    for a, b in zip(single, mirrored):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    for name in ("g_loss", "d_loss", "cycle_loss"):
        assert single_logs[name][0] == pytest.approx(mirrored_logs[name][0], abs=1e-6)


def test_batch_not_divisible_by_replicas():
    strategy = tf.distribute.MirroredStrategy(_two_cpus())
    with pytest.raises(ConfigError, match="not divisible by the 2 replicas"):
        check_batch_size(3, strategy)
    check_batch_size(4, strategy)


def test_image_pool_fills_then_mixes_history():
    tf.random.set_seed(0)
    pool = ImagePool(4, (2, 2, 1))
    query = tf.function(pool.query)
    first = np.full((3, 2, 2, 1), 1.0, np.float32)
    np.testing.assert_array_equal(query(first), first)  # while filling, fakes pass through
    seen = []
    for value in range(2, 40):
        batch = np.full((3, 2, 2, 1), float(value), np.float32)
        out = query(batch).numpy()[:, 0, 0, 0]
        assert all(v <= value for v in out)  # a fake or an older one from the history
        seen.extend(out.tolist())
        assert int(pool.count.numpy()) == 4
    assert any(v < value for v, value in zip(seen, np.repeat(np.arange(2, 40), 3)))  # history was used
    assert any(v == value for v, value in zip(seen, np.repeat(np.arange(2, 40), 3)))  # fresh fakes too


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
