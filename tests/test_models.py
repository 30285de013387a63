"""Generator (MC dropout, prefix/suffix split, serialisation), PatchGAN critic and the artifact files."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from microsr_tf.errors import ConfigError, InputError
from microsr_tf.models.artifact import load_generator, meta_path_for, save_generator
from microsr_tf.models.discriminator import PatchDiscriminator
from microsr_tf.models.generator import ResnetGenerator, with_precision
from microsr_tf.models.dropout import MCDropout
from microsr_tf.models.head import OneChannelHead
from microsr_tf.models.normalization import InstanceNorm, instance_norm
from microsr_tf.models.padding import ReflectionPadding2D
from microsr_tf.models.upsampling import BilinearResizeConv2D, SubPixelResizeConv2D

POSITIONS = ("bottleneck", "resblocks", "none")
UPSAMPLES = ("transpose", "resize", "bilinear")
# Convolutions blocked for different batch sizes round differently in float32.
ACROSS_BATCH_ATOL = 1e-5


def tiny(position="bottleneck", upsample="transpose", **kwargs) -> ResnetGenerator:
    return ResnetGenerator(ngf=4, n_blocks=2, upsample=upsample, dropout_position=position, **kwargs)


def image(rng, *shape) -> tf.Tensor:
    return tf.constant(rng.uniform(size=shape + (1,)).astype("float32"))


def seeds(*rows) -> tf.Tensor:
    return tf.constant(rows, tf.int32)


# ----- layers -----------------------------------------------------------------------------------

def test_reflection_padding_mirrors_without_repeating_the_edge():
    x = tf.reshape(tf.range(9, dtype=tf.float32), [1, 3, 3, 1])
    y = ReflectionPadding2D(1)(x)[0, :, :, 0].numpy()
    assert y.shape == (5, 5)
    np.testing.assert_array_equal(y[0, 1:4], [3, 4, 5])  # row 1 mirrored above row 0
    np.testing.assert_array_equal(y[1:4, 0], [1, 4, 7])
    assert ReflectionPadding2D.from_config(ReflectionPadding2D(3).get_config()).padding == 3


def test_mc_dropout_rate_scaling_and_identity():
    x = tf.ones([4, 32, 32, 16])
    y = MCDropout(0.3)(x).numpy()
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.7], rtol=1e-6)
    assert abs((y > 0).mean() - 0.7) < 0.01
    np.testing.assert_array_equal(MCDropout(0.0)(x, seed=seeds(*[[1, 2]] * 4)), x)


def test_mc_dropout_seeded_masks_are_per_example_and_per_layer():
    x = tf.ones([3, 16, 16, 8])
    rows = seeds([1, 2], [1, 3], [-7, 2**31 - 1])
    batch = MCDropout(0.5)(x, seed=rows).numpy()
    for i in range(3):  # row i alone gives the same mask, bit for bit
        np.testing.assert_array_equal(MCDropout(0.5)(x[i:i + 1], seed=rows[i:i + 1])[0], batch[i])
    keep = batch > 0
    other_layer = MCDropout(0.5, index=1)(x, seed=rows).numpy() > 0
    first_word = MCDropout(0.5)(x, seed=seeds([0, 2], [1, 2], [2, 2])).numpy() > 0
    # independent masks agree on about half of the elements
    np.testing.assert_array_equal(first_word[1], keep[0])  # same row [1, 2], other batch
    for a, b in [(keep[0], keep[1]), (keep[0], other_layer[0]), (first_word[0], first_word[1]),
                 (first_word[0], first_word[2])]:
        assert 0.45 < (a == b).mean() < 0.55


def test_mc_dropout_without_seed_draws_fresh_masks_and_gradients_flow():
    layer = MCDropout(0.5)
    x = tf.ones([2, 8, 8, 4])
    assert not np.array_equal(layer(x), layer(x))
    v = tf.Variable(x)
    with tf.GradientTape() as tape:
        y = layer(v, seed=seeds([5, 6], [7, 8]))
        total = tf.reduce_sum(y)
    np.testing.assert_array_equal(tape.gradient(total, v), y)  # d(x*m)/dx = m = y for x=1


def test_subpixel_resize_equals_nearest_upsampling_then_conv(rng):
    x = tf.constant(rng.normal(size=(2, 5, 7, 6)).astype("float32"))
    reference = keras.Sequential([keras.layers.UpSampling2D(2), keras.layers.Conv2D(3, 3, padding="same")])
    reference.build(x.shape)
    reference.layers[1].bias.assign(rng.normal(size=3).astype("float32"))
    layer = SubPixelResizeConv2D(3)
    layer.build(x.shape)
    layer.set_weights(reference.get_weights())
    np.testing.assert_allclose(layer(x), reference(x), atol=1e-5)


def test_bilinear_resize_conv_equals_keras_bilinear_upsampling_then_conv(rng):
    x = tf.constant(rng.normal(size=(2, 5, 7, 6)).astype("float32"))
    reference = keras.Sequential([keras.layers.UpSampling2D(2, interpolation="bilinear"),
                                  keras.layers.Conv2D(3, 3, padding="same")])
    reference.build(x.shape)
    reference.layers[1].bias.assign(rng.normal(size=3).astype("float32"))
    layer = BilinearResizeConv2D(3)
    layer.build(x.shape)
    layer.set_weights(reference.get_weights())
    assert layer(x).shape == (2, 10, 14, 3)
    np.testing.assert_allclose(layer(x), reference(x), atol=1e-5)


@pytest.mark.parametrize("xla", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_instance_norm_equals_keras_group_normalization(rng, xla, relu):
    x = tf.constant((3.0 + rng.normal(size=(3, 9, 7, 5))).astype("float32"))
    reference_layer = instance_norm()
    reference_layer.build(x.shape)
    reference_layer.gamma.assign(rng.normal(size=5).astype("float32"))
    reference_layer.beta.assign(rng.normal(size=5).astype("float32"))
    reference = reference_layer(x).numpy()
    norm = InstanceNorm(relu=relu)
    norm.build(x.shape)
    norm.set_weights(reference_layer.get_weights())
    norm.xla = xla
    np.testing.assert_allclose(norm(x), np.maximum(reference, 0) if relu else reference, atol=1e-5)
    assert InstanceNorm.from_config(norm.get_config()).relu is relu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("relu", [False, True])
def test_instance_norm_kernel_gradients_equal_the_plain_ops_derivative(rng, relu, dtype):
    x = tf.cast(tf.constant((3.0 + rng.normal(size=(3, 9, 7, 5))).astype("float32")), dtype)
    probe = tf.constant(rng.normal(size=(3, 9, 7, 5)).astype("float32"))  # d loss / d output
    norm = InstanceNorm(relu=relu)
    norm.build(x.shape)
    norm.gamma.assign(rng.normal(size=5).astype("float32"))
    norm.beta.assign(rng.normal(size=5).astype("float32"))
    grads = {}
    for xla in (True, False):
        norm.xla = xla
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(norm(x), tf.float32) * probe)
        grads[xla] = [tf.cast(g, tf.float32).numpy() for g in tape.gradient(loss, [x, norm.gamma, norm.beta])]
    tolerance = 1e-4 if dtype == "float32" else 2**-7  # the input gradient is rounded to bfloat16
    for name, fused, plain in zip(["x", "gamma", "beta"], grads[True], grads[False]):
        assert np.abs(plain).max() > 0.1, name
        np.testing.assert_allclose(fused, plain, atol=tolerance * np.abs(plain).max(), rtol=0, err_msg=name)


@pytest.mark.parametrize("xla", [True, False])
def test_one_channel_head_equals_reflection_padding_then_conv(rng, xla):
    x = tf.constant(rng.normal(size=(2, 12, 10, 6)).astype("float32"))
    conv = keras.layers.Conv2D(1, 7)
    conv.build((None, 18, 16, 6))
    conv.bias.assign([0.3])
    expected = conv(ReflectionPadding2D(3)(x)).numpy()
    head = OneChannelHead(7)
    head.build(x.shape)
    head.set_weights(conv.get_weights())
    head.xla = xla
    y = head(x).numpy()
    assert y.shape == (2, 12, 10, 1)
    np.testing.assert_allclose(y, expected, atol=1e-5)


# ----- generator --------------------------------------------------------------------------------

@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_generator_shapes_and_range_with_unknown_size(rng, upsample):
    gen = tiny(upsample=upsample)
    run = tf.function(gen, input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
    for h, w in [(32, 32), (32, 48), (64, 36)]:
        y = run(image(rng, 2, h, w)).numpy()
        assert y.shape == (2, h, w, 1) and y.dtype == np.float32
        assert 0.0 <= y.min() and y.max() <= 1.0


@pytest.mark.parametrize("position", ["bottleneck", "resblocks"])
def test_dropout_is_on_at_inference(rng, position):
    gen = tiny(position)
    x = image(rng, 2, 32, 32)
    assert gen.n_dropout_layers == (1 if position == "bottleneck" else 2)
    assert np.abs(gen(x, training=False) - gen(x, training=False)).max() > 1e-4
    assert np.abs(gen.predict(x, verbose=0) - gen.predict(x, verbose=0)).max() > 1e-4


def test_position_none_and_zero_rate_are_deterministic(rng):
    x = image(rng, 2, 32, 32)
    for gen in (tiny("none"), tiny("bottleneck", dropout_rate=0.0)):
        assert gen.n_dropout_layers == 0
        np.testing.assert_array_equal(gen(x), gen(x))


@pytest.mark.parametrize("position", ["bottleneck", "resblocks"])
def test_seeded_samples_are_reproducible_and_per_example(rng, position):
    gen = tiny(position)
    x = image(rng, 3, 32, 32)
    rows = seeds([0, 1], [0, 2], [123, -5])
    a = gen(x, seed=rows).numpy()
    np.testing.assert_array_equal(a, gen(x, seed=rows))
    assert np.abs(a - gen(x, seed=seeds([9, 1], [9, 2], [9, 3]))).max() > 1e-4
    for i in range(3):
        np.testing.assert_allclose(gen(x[i:i + 1], seed=rows[i:i + 1])[0], a[i], atol=ACROSS_BATCH_ATOL)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_prefix_then_suffix_equals_call_and_tiles_into_samples(rng, position, upsample):
    gen = tiny(position, upsample)
    x = image(rng, 1, 32, 40)
    features = gen.deterministic_prefix(x)
    assert isinstance(features, tuple)
    rows = seeds([3, 0], [3, 1], [3, 2], [4, 0])
    tiled = tuple(tf.repeat(f, 4, axis=0) for f in features)
    samples = gen.stochastic_suffix(tiled, rows).numpy()
    for t in range(4):
        np.testing.assert_allclose(samples[t], gen(x, seed=rows[t:t + 1])[0], atol=ACROSS_BATCH_ATOL)
    spread = samples.std(axis=0).max()
    assert (spread == 0) if position == "none" else (spread > 1e-4)


def plain_twin(gen: ResnetGenerator, x: tf.Tensor) -> ResnetGenerator:
    """A copy of a built ``gen`` with the same weights whose kernels run as plain, uncompiled ops."""
    twin = ResnetGenerator.from_config(gen.get_config())
    twin.xla_kernels = False
    twin(x)
    twin.set_weights(gen.get_weights())
    return twin


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_xla_kernels_equal_plain_ops_in_outputs_and_gradients(rng, position, upsample):
    keras.utils.set_random_seed(0)  # fixed weights: the gradient tolerance must not depend on test order
    gen = tiny(position, upsample)
    x = image(rng, 2, 32, 40)
    rows = seeds([1, 2], [3, 4])
    gen(x, seed=rows)
    for v in gen.trainable_variables:  # move gamma/beta and biases off their initial values
        v.assign(v + 0.1 * tf.random.stateless_normal(v.shape, [7, len(v.path)]))
    twin = plain_twin(gen, x)
    results = []
    for model in (gen, twin):
        with tf.GradientTape() as tape:
            y = model(x, seed=rows)
            loss = tf.reduce_mean(tf.square(y - x))
        results.append((y.numpy(), tape.gradient(loss, model.trainable_variables)))
    (y_fused, g_fused), (y_plain, g_plain) = results
    np.testing.assert_allclose(y_fused, y_plain, atol=1e-5)
    scale = max(float(np.abs(g).max()) for g in g_plain)
    assert len(g_fused) == len(g_plain)
    for a, b in zip(g_fused, g_plain):
        np.testing.assert_allclose(a, b, atol=1e-4 * scale)
    np.testing.assert_allclose(gen.stochastic_suffix(gen.deterministic_prefix(x), rows),
                               twin.stochastic_suffix(twin.deterministic_prefix(x), rows), atol=1e-5)


def test_flops_split_moves_with_the_dropout_position():
    split = {p: ResnetGenerator(dropout_position=p).flops_per_pixel() for p in POSITIONS}
    totals = {p: s["prefix"] + s["suffix"] for p, s in split.items()}
    assert len(set(totals.values())) == 1
    assert split["none"]["suffix"] == 0
    assert 0 < split["bottleneck"]["suffix"] < split["resblocks"]["suffix"]
    # the trunk dominates: the per-sample suffix is a small fraction of the network
    assert split["bottleneck"]["suffix"] < 0.1 * totals["bottleneck"]


def test_invalid_generator_settings_raise_config_error():
    with pytest.raises(ConfigError, match="upsample"):
        ResnetGenerator(upsample="nearest")
    with pytest.raises(ConfigError, match="dropout_position"):
        ResnetGenerator(dropout_position="everywhere")


def test_generator_trains(rng):
    gen = tiny("resblocks")
    x = image(rng, 2, 32, 32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(gen(x) - x))
    grads = tape.gradient(loss, gen.trainable_variables)
    assert len(grads) == len(gen.trainable_variables) > 0
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)


def test_get_config_round_trip(rng):
    gen = tiny("resblocks", "resize", dropout_rate=0.25)
    x = image(rng, 1, 32, 32)
    gen(x)
    clone = ResnetGenerator.from_config(gen.get_config())
    assert clone.get_config() == {**gen.get_config(), "name": clone.name}
    clone(x)
    clone.set_weights(gen.get_weights())
    rows = seeds([1, 1])
    np.testing.assert_allclose(clone(x, seed=rows), gen(x, seed=rows), atol=1e-6)


def test_keras_file_round_trip(rng, tmp_path):
    gen = tiny("bottleneck", "resize")
    x = image(rng, 2, 32, 32)
    rows = seeds([5, 5], [6, 6])
    expected = gen(x, seed=rows).numpy()
    gen.save(tmp_path / "g.keras")
    loaded = keras.saving.load_model(tmp_path / "g.keras", compile=False)
    assert isinstance(loaded, ResnetGenerator)
    np.testing.assert_array_equal(loaded(x, seed=rows), expected)


def test_mirrored_replicas_draw_different_masks(rng, two_cpus):
    strategy = tf.distribute.MirroredStrategy(two_cpus)
    with strategy.scope():
        gen = tiny("bottleneck")
    x = image(rng, 1, 32, 32)
    gen(x)

    @tf.function
    def step():
        return strategy.run(gen, args=(x,))

    first, second = strategy.experimental_local_results(step())
    assert np.abs(first.numpy() - second.numpy()).max() > 1e-4


# ----- discriminator ----------------------------------------------------------------------------

def test_patch_discriminator_shapes_logits_and_config(rng):
    disc = PatchDiscriminator(ndf=8, n_layers=3)
    assert disc(image(rng, 2, 64, 64)).shape == (2, 6, 6, 1)
    logits = disc(image(rng, 1, 256, 256)).numpy()
    assert logits.shape == (1, 30, 30, 1)
    assert logits.min() < 0  # raw logits, no sigmoid
    clone = PatchDiscriminator.from_config(disc.get_config())
    assert (clone.ndf, clone.n_layers) == (8, 3)
    assert PatchDiscriminator(ndf=4, n_layers=2)(image(rng, 1, 64, 64)).shape == (1, 14, 14, 1)


# ----- artifact ---------------------------------------------------------------------------------

META = {"lr_spacing": [0.3, 0.3, 0.3], "stats": {"mean": 1.5}, "model": {"ngf": 4}}


def test_artifact_round_trip_file_and_run_directory(rng, tmp_path):
    gen = tiny("resblocks")
    x = image(rng, 1, 32, 32)
    rows = seeds([2, 3])
    expected = gen(x, seed=rows).numpy()
    save_generator(gen, tmp_path / "generator.keras", META)
    assert sorted(os.listdir(tmp_path)) == ["generator.keras", "generator.meta.json"]  # no temporaries left
    for source in (tmp_path / "generator.keras", tmp_path):
        loaded, meta = load_generator(source)
        assert meta == META
        np.testing.assert_array_equal(loaded(x, seed=rows), expected)
    assert meta_path_for("a/b.keras") == "a/b.meta.json"


def test_artifact_input_errors(rng, tmp_path):
    gen = tiny()
    gen(image(rng, 1, 32, 32))
    with pytest.raises(InputError, match="no such file"):
        load_generator(tmp_path / "missing.keras")
    with pytest.raises(InputError, match=r"\.keras"):
        save_generator(gen, tmp_path / "generator.h5", META)

    (tmp_path / "text.keras").write_text("not a zip")
    with pytest.raises(InputError, match="not a Keras archive"):
        load_generator(tmp_path / "text.keras")

    save_generator(gen, tmp_path / "g.keras", META)
    os.unlink(tmp_path / "g.meta.json")
    with pytest.raises(InputError, match="metadata file is missing") as info:
        load_generator(tmp_path / "g.keras")
    assert info.value.path == str(tmp_path / "g.meta.json")
    (tmp_path / "g.meta.json").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        load_generator(tmp_path / "g.keras")
    (tmp_path / "g.meta.json").write_text(json.dumps([1, 2]))
    with pytest.raises(InputError, match="JSON object"):
        load_generator(tmp_path / "g.keras")

    (tmp_path / "empty_run").mkdir()
    with pytest.raises(InputError, match="no generator.keras"):
        load_generator(tmp_path / "empty_run")
    (tmp_path / "training" / "checkpoints").mkdir(parents=True)  # a run still training: says so
    with pytest.raises(InputError, match="this training run has not finished: no generator.keras yet") as exc:
        load_generator(tmp_path / "training")
    assert "generator_best" not in str(exc.value)
    (tmp_path / "training" / "generator_best.keras").write_bytes(b"")
    with pytest.raises(InputError, match="generator_best.keras holds the best epoch so far"):
        load_generator(tmp_path / "training")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "saved_model.pb").write_bytes(b"")
    with pytest.raises(InputError, match="SavedModel"):
        load_generator(tmp_path / "export")

    disc = PatchDiscriminator(ndf=4)
    disc(image(rng, 1, 64, 64))
    disc.save(tmp_path / "d.keras")
    (tmp_path / "d.meta.json").write_text("{}")
    with pytest.raises(InputError, match="not a ResnetGenerator"):
        load_generator(tmp_path / "d.keras")


# ----- bfloat16 inference ----------------------------------------------------------------------

def test_fused_kernels_compute_bfloat16_inputs_in_float32(rng):
    x = tf.cast(tf.constant((3.0 + rng.normal(size=(2, 12, 10, 6))).astype("float32")), tf.bfloat16)
    wide = tf.cast(x, tf.float32)  # the same values, exactly
    norm = InstanceNorm(relu=True, dtype="mixed_bfloat16")  # as in with_precision's copies
    norm.build(x.shape)
    norm.gamma.assign(rng.normal(size=6).astype("float32"))
    y = norm(x)
    assert y.dtype == tf.bfloat16
    # float32 statistics and arithmetic: within one bfloat16 rounding of the float32 result
    np.testing.assert_allclose(tf.cast(y, tf.float32), norm.call(wide), rtol=2**-8, atol=1e-6)
    head = OneChannelHead(7, dtype="mixed_bfloat16")
    head.build(x.shape)
    assert head(x).dtype == tf.float32
    np.testing.assert_array_equal(head(x), head(wide))


@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_bfloat16_copy_shares_weights_and_stays_close(rng, upsample):
    gen = tiny("resblocks", upsample)
    x, rows = image(rng, 2, 32, 32), seeds([1, 2], [3, 4])
    expected = gen(x, seed=rows).numpy()
    assert with_precision(gen, "float32") is gen
    fast = with_precision(gen, "bfloat16")
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    convs = [layer for layer in fast._flatten_layers() if isinstance(layer, (keras.layers.Conv2D,
                                                                             SubPixelResizeConv2D))]
    assert convs and all(c.compute_dtype == "bfloat16" and c.variable_dtype == "float32" for c in convs)
    for a, b in zip(fast.get_weights(), gen.get_weights()):
        np.testing.assert_array_equal(a, b)
    y = fast(x, seed=rows)
    assert y.dtype == tf.float32
    np.testing.assert_allclose(y, expected, atol=2e-2)
    assert np.abs(y - expected).max() > 0
    np.testing.assert_array_equal(y, fast(x, seed=rows))
    with pytest.raises(ConfigError, match="precision"):
        with_precision(gen, "half")
