"""Speed paths of the generator compute what the plain layers compute: the bfloat16 sub-pixel transposed
convolution and its gradients against Keras' own layer, and the decoder's reach (the stripes' halo) against what the
decoder actually reads."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from microsr_tf.inference.mc import MonteCarloPredictor, naive_predict
from microsr_tf.models.generator import ResnetGenerator
from microsr_tf.models.upsampling import Conv2DTranspose

BF16_EPS = 2.0**-8  # bfloat16 keeps 8 significant bits


def bf16_round(x) -> np.ndarray:
    return tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy()


@pytest.fixture
def layers():
    """Our layer (built under mixed_bfloat16) and Keras' float32 layer with the same weights."""
    x = tf.random.stateless_uniform([2, 9, 11, 24], [0, 1], -1, 1)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        ours = Conv2DTranspose(16)
        ours.build(x.shape)
    finally:
        keras.config.set_dtype_policy(previous)
    ours.bias.assign(tf.random.stateless_normal([16], [0, 2]))
    reference = keras.layers.Conv2DTranspose(16, 3, strides=2, padding="same")
    reference.build(x.shape)
    reference.set_weights([bf16_round(w) for w in ours.get_weights()])
    return x, ours, reference


def test_bfloat16_sub_pixel_form_equals_the_transposed_convolution(layers):
    x, ours, reference = layers
    fast = ours(x).numpy().astype(np.float32)
    assert ours.compute_dtype == "bfloat16" and fast.shape == (2, 18, 22, 16)
    exact = reference(bf16_round(x)).numpy()  # the same products, summed in float32
    for a in range(2):  # each output phase (row and column parity) has its own kernel taps
        for b in range(2):
            phase, truth = fast[:, a::2, b::2], exact[:, a::2, b::2]
            assert np.abs(phase - truth).max() <= 2 * BF16_EPS * np.abs(truth).max()
            assert np.abs(truth).mean() > 0.1  # a phase of zeros would not pass as "close"


def test_bfloat16_sub_pixel_form_has_the_transposed_convolutions_gradients(layers):
    x, ours, reference = layers
    probe = tf.random.stateless_normal([2, 18, 22, 16], [0, 3])  # d loss / d output

    def gradients(layer, inputs):
        inputs = tf.convert_to_tensor(inputs)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(tf.cast(layer(inputs), tf.float32) * probe)
        return [g.numpy().astype(np.float32) for g in tape.gradient(loss, [inputs, layer.kernel, layer.bias])]

    fast = gradients(ours, x)
    exact = gradients(reference, bf16_round(x))
    for name, g, truth in zip(["input", "kernel", "bias"], fast, exact):
        assert g.shape == truth.shape, name
        assert np.abs(g - truth).max() <= 4 * BF16_EPS * np.abs(truth).max(), name
        assert np.abs(truth).mean() > 0.1, name


def test_float32_layer_is_keras_layer_and_loads_its_weights(tmp_path):
    x = tf.random.stateless_uniform([1, 6, 7, 8], [1, 1])
    keras_model = keras.Sequential([keras.Input((None, None, 8)), keras.layers.Conv2DTranspose(4, 3, strides=2,
                                                                                                padding="same")])
    keras_model.save_weights(tmp_path / "w.weights.h5")
    ours = keras.Sequential([keras.Input((None, None, 8)), Conv2DTranspose(4)])
    ours.load_weights(tmp_path / "w.weights.h5")  # weights are filed under the class name
    np.testing.assert_array_equal(ours(x).numpy(), keras_model(x).numpy())


@pytest.mark.parametrize("blur", ["none", "binomial"])
@pytest.mark.parametrize("upsample", ["transpose", "resize", "bilinear"])
def test_decoder_reach_is_exactly_the_rows_the_decoder_reads(upsample, blur):
    tf.keras.utils.set_random_seed(0)
    gen = ResnetGenerator(ngf=4, n_blocks=1, upsample=upsample, decoder_norm="none", decoder_blur=blur)
    gen(tf.zeros([1, 16, 16, 1]))
    h = tf.random.stateless_normal([1, 12, 6, 16], [3, 3])
    base = gen.decode(h).numpy()[0, ..., 0]
    read_by = {b: set() for b in range(12)}  # output block row -> trunk rows it depends on
    for r in range(12):
        bumped = h.numpy()
        bumped[0, r] += 1.0
        changed = np.abs(gen.decode(tf.constant(bumped)).numpy()[0, ..., 0] - base).max(axis=1) > 0
        for b in range(12):
            if changed[4 * b:4 * b + 4].any():
                read_by[b].add(r)
    above, below = gen.decoder_reach
    for b in range(3, 9):  # away from the reflected borders
        assert read_by[b] == set(range(b - above, b + below + 1))


def test_bfloat16_stripes_with_the_tight_halo_match_full_passes():
    tf.keras.utils.set_random_seed(2)
    gen = ResnetGenerator(ngf=4, n_blocks=2, decoder_norm="none")
    gen(tf.zeros([1, 16, 16, 1]))
    x = np.random.default_rng(1).random((1, 48, 40, 1)).astype(np.float32)
    exact = naive_predict(gen, x, samples=6, seed=9)  # T float32 full passes
    striped = [MonteCarloPredictor(gen, samples=6, seed=9, stripe=s, precision="bfloat16", chunk_size=4).predict(x)
               for s in (4, 12, None)]
    for result in striped:
        np.testing.assert_allclose(result.mean, exact.mean, atol=1e-2)
        np.testing.assert_allclose(result.var, exact.var, atol=0.1 * exact.var.max())
    # the stripe height changes nothing: bfloat16 rounding is the same whatever the stripe
    for result in striped[1:]:
        np.testing.assert_allclose(result.mean, striped[0].mean, atol=1e-6)


def test_binomial_blur_is_the_separable_121_filter_and_removes_the_nyquist_stripes():
    from scipy.ndimage import convolve1d

    from microsr_tf.models.upsampling import BinomialBlur2D

    x = np.random.default_rng(5).random((2, 12, 10, 3)).astype(np.float32)
    expected = convolve1d(convolve1d(x, [0.25, 0.5, 0.25], axis=1, mode="mirror"), [0.25, 0.5, 0.25], axis=2,
                          mode="mirror")  # scipy's "mirror" reflects without repeating the edge, as tf.pad REFLECT
    np.testing.assert_allclose(BinomialBlur2D()(x).numpy(), expected, atol=1e-6)
    stripes = np.tile(np.array([0.3, 0.7], np.float32)[:, None], (6, 10))[None, :, :, None]  # alternating rows
    np.testing.assert_allclose(BinomialBlur2D()(stripes).numpy()[0, 1:-1, :, 0], 0.5, atol=1e-6)
    gen = ResnetGenerator(ngf=4, n_blocks=1, upsample="bilinear", decoder_norm="none", decoder_blur="binomial")
    assert sum(isinstance(layer, BinomialBlur2D) for layer in gen.decoder) == 2
    clone = ResnetGenerator.from_config(gen.get_config())
    assert clone.decoder_blur == "binomial"
