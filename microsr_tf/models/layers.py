"""Small Keras layers the networks are built from: reflection padding, instance norm, MC dropout,
and a resize-convolution computed at the low resolution (sub-pixel form); plus fused, XLA-compiled
equivalents of instance norm (+ ReLU) and of a reflection-padded one-channel convolution that the
generator's forward pass runs with those layers' weights.

Monte Carlo dropout masks come from a counter-based hash (the murmur3 finaliser) of
``(seed row, layer index, element position)``, so a sample is a pure function of its seed row and
whole batches of differently seeded samples are drawn in one fused, XLA-compiled pass.
"""

from __future__ import annotations

import keras
import tensorflow as tf

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive integers over the 32-bit range
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _fmix32(h: tf.Tensor) -> tf.Tensor:
    """Murmur3's 32-bit finaliser: a bijective mix where every input bit flips each output bit
    with probability ~1/2."""
    shift = tf.bitwise.right_shift
    xor = tf.bitwise.bitwise_xor
    h = xor(h, shift(h, tf.constant(16, tf.uint32)))
    h = h * tf.constant(0x85EBCA6B, tf.uint32)
    h = xor(h, shift(h, tf.constant(13, tf.uint32)))
    h = h * tf.constant(0xC2B2AE35, tf.uint32)
    return xor(h, shift(h, tf.constant(16, tf.uint32)))


def _py_fmix32(h: int) -> int:
    """:func:`_fmix32` on a Python int, for per-layer constants."""
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _dropout_mask_ops(x: tf.Tensor, seed: tf.Tensor, salt: tf.Tensor, threshold: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """Inverted-dropout mask shaped like ``x``: 0 or ``scale``; row ``i`` depends only on
    ``seed[i]``, ``salt`` (the layer) and the shape of one example. Elements are kept where their
    32-bit hash is at least ``threshold``. The constants are tensors so that one trace serves all
    layers."""
    shape = tf.shape(x)
    per_example = tf.reduce_prod(shape[1:])
    s = tf.bitcast(seed, tf.uint32)
    key = _fmix32(tf.bitwise.bitwise_xor(s[:, 0], salt))
    key = _fmix32(tf.bitwise.bitwise_xor(key, s[:, 1]) + tf.constant(_GOLDEN, tf.uint32))
    position = _fmix32(tf.bitcast(tf.range(per_example), tf.uint32))
    bits = _fmix32(tf.bitwise.bitwise_xor(position[None, :], key[:, None]))
    mask = tf.where(bits >= threshold, scale, tf.zeros([], x.dtype))
    return tf.reshape(mask, shape)


_dropout_mask = tf.function(_dropout_mask_ops, jit_compile=True, reduce_retracing=True)


def image_seeds(seed: int, n: int) -> "np.ndarray":
    """``[n]`` int32 dropout seeds of the images of a batch predicted with one base ``seed``.

    The one convention of library, CLI and served signatures: image 0 uses ``seed`` itself (so a
    single slice sent with a seed equals a local prediction of that slice with that seed) and image
    ``b > 0`` uses ``fmix32(seed ^ fmix32(b * golden)) >> 1``, a 31-bit hash that never wraps out of
    range. :func:`image_seeds_tf` computes the same in a graph.
    """
    import numpy as np

    seeds = [int(seed)] + [_py_fmix32(int(seed) ^ _py_fmix32(b * _GOLDEN)) >> 1 for b in range(1, int(n))]
    return np.asarray(seeds, np.int32)


def image_seeds_tf(seed: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    """Graph form of :func:`image_seeds`: ``[n]`` int32 seeds from a scalar int32 ``seed``."""
    b = tf.bitcast(tf.range(n, dtype=tf.int32), tf.uint32)
    s = tf.bitcast(tf.cast(seed, tf.int32), tf.uint32)
    hashed = tf.bitwise.right_shift(_fmix32(tf.bitwise.bitwise_xor(s, _fmix32(b * tf.constant(_GOLDEN, tf.uint32)))),
                                    tf.constant(1, tf.uint32))
    return tf.bitcast(tf.where(tf.equal(b, 0), s, hashed), tf.int32)


def _random_seeds(batch: tf.Tensor) -> tf.Tensor:
    """Fresh ``[batch, 2]`` int32 seed rows, made distinct per replica under a distribution strategy."""
    seeds = tf.random.uniform([batch, 2], _INT32_MIN, _INT32_MAX, dtype=tf.int32)
    context = tf.distribute.get_replica_context()
    if context is None:
        return seeds
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    return tf.bitwise.bitwise_xor(seeds, tf.stack([tf.zeros_like(replica), replica])[None, :])


@keras.saving.register_keras_serializable(package="microsr_tf")
class ReflectionPadding2D(keras.layers.Layer):
    """Mirror-pad height and width by ``padding`` pixels (no edge repeat), as CycleGAN's generator."""

    def __init__(self, padding: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.padding = int(padding)

    def call(self, x):
        p = self.padding
        return tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]], mode="REFLECT")

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        grow = lambda n: None if n is None else n + 2 * self.padding  # noqa: E731
        return (b, grow(h), grow(w), c)

    def get_config(self):
        return {**super().get_config(), "padding": self.padding}


def instance_norm(name: str | None = None) -> keras.layers.GroupNormalization:
    """Instance normalisation with learned scale and offset: one group per channel."""
    return keras.layers.GroupNormalization(groups=-1, epsilon=1e-5, name=name)


def is_instance_norm(layer, channels: int) -> bool:
    """Whether ``layer`` is a built :func:`instance_norm` (one group per channel, scale and offset)
    over the last axis of ``channels``-channel inputs."""
    return (isinstance(layer, keras.layers.GroupNormalization) and layer.built and layer.groups == channels
            and layer.axis in (-1, 3) and layer.scale and layer.center)


def _instance_norm_ops(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float, relu: bool) -> tf.Tensor:
    """Per-(example, channel) normalisation over height and width, scale, offset and optional ReLU,
    compiled by XLA into two reduction passes and one elementwise pass. Statistics and arithmetic are
    float32 whatever ``x``'s dtype (the casts fuse into the passes); the result has ``x``'s dtype."""
    dtype = x.dtype
    x = tf.cast(x, tf.float32)
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    var = tf.reduce_mean(tf.square(x - mean), axis=[1, 2], keepdims=True)
    scale = gamma * tf.math.rsqrt(var + epsilon)
    y = x * scale + (beta - mean * scale)
    return tf.cast(tf.nn.relu(y) if relu else y, dtype)


_instance_norm_kernel = tf.function(_instance_norm_ops, jit_compile=True, reduce_retracing=True)


def fused_instance_norm(x: tf.Tensor, norm: keras.layers.GroupNormalization, relu: bool = False,
                        xla: bool = True) -> tf.Tensor:
    """``norm(x)`` (then ReLU when ``relu``) for an :func:`instance_norm` layer, computed in one compiled
    kernel with the layer's weights; ~3x faster than the Keras layer (which reduces over a 5-D grouped
    view and runs each step as a separate pass) and equal to float rounding. Returns ``x``'s dtype."""
    kernel = _instance_norm_kernel if xla else _instance_norm_ops
    return kernel(x, tf.cast(norm.gamma, tf.float32), tf.cast(norm.beta, tf.float32), float(norm.epsilon), bool(relu))


def is_one_channel_conv(layer, padding: int) -> bool:
    """Whether ``layer`` is a built stride-1 "valid" ``Conv2D`` into one channel with a square
    ``2 * padding + 1`` kernel and no activation, i.e. a "same" head after reflection padding."""
    return (isinstance(layer, keras.layers.Conv2D) and layer.built and layer.filters == 1 and layer.use_bias
            and tuple(layer.kernel_size) == (2 * padding + 1,) * 2 and tuple(layer.strides) == (1, 1)
            and tuple(layer.dilation_rate) == (1, 1) and layer.padding == "valid" and layer.groups == 1
            and layer.data_format == "channels_last" and layer.activation is keras.activations.linear)


def _reflect_conv_one_channel_ops(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """Reflection padding then a ``k x k`` valid convolution into one channel, as one ``C -> k*k`` matrix
    product (channel-first, so each tap is a contiguous plane) and ``k*k`` shifted plane sums.

    Padding commutes with the pointwise product, so the planes are padded instead of the ``C``-channel
    input; summing columns then rows keeps the adds to ``k*k + k`` planes. Computes in float32 whatever
    ``x``'s dtype: XLA's CPU matrix product is slower in bfloat16 than in float32.
    """
    x = tf.cast(x, tf.float32)
    k = kernel.shape[0]
    p = k // 2
    shape = tf.shape(x)
    b, h, w, c = shape[0], shape[1], shape[2], shape[3]
    taps = tf.matmul(tf.reshape(kernel, [k * k, c]), tf.reshape(x, [-1, c]), transpose_b=True)
    taps = tf.pad(tf.reshape(taps, [k, k, b, h, w]), [[0, 0], [0, 0], [0, 0], [p, p], [p, p]], mode="REFLECT")
    rows = tf.add_n([taps[:, j, :, :, j:j + w] for j in range(k)])  # [k, B, H + 2p, W]
    y = tf.add_n([rows[i, :, i:i + h, :] for i in range(k)])
    return (y + bias[0])[..., None]


_reflect_conv_one_channel_kernel = tf.function(_reflect_conv_one_channel_ops, jit_compile=True,
                                               reduce_retracing=True)


def reflect_conv_one_channel(x: tf.Tensor, conv: keras.layers.Conv2D, xla: bool = True) -> tf.Tensor:
    """``conv(ReflectionPadding2D(k // 2)(x))`` for a one-channel ``k x k`` conv (see
    :func:`is_one_channel_conv`), with the conv's weights. A convolution into a single channel keeps
    the vector units of a standard kernel mostly idle (~3 GFLOP/s here); this form runs the work as a
    matrix product and is ~4x faster, equal to float rounding. The result is float32 (it feeds the
    float32 output activation, so a bfloat16 input is not rounded again at the end)."""
    kernel = _reflect_conv_one_channel_kernel if xla else _reflect_conv_one_channel_ops
    return kernel(x, tf.cast(conv.kernel, tf.float32), tf.cast(conv.bias, tf.float32))


@keras.saving.register_keras_serializable(package="microsr_tf")
class MCDropout(keras.layers.Layer):
    """Dropout that is always on (training, inference and exported graphs), for MC sampling.

    ``call(x, seed)``: ``seed`` is an int32 ``[B, 2]`` tensor, one row per example; example ``i``'s
    mask depends only on ``seed[i]``, this layer's ``index`` and the shape of ``x``, so equal seeds
    give bit-identical samples. Without a seed each call draws fresh masks.
    """

    xla = True  # False: the mask is computed by plain ops (graphs for servers without XLA)

    def __init__(self, rate: float, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.index = int(index)

    def call(self, x, seed=None):
        if self.rate == 0.0:
            return x
        if seed is None:
            seed = _random_seeds(tf.shape(x)[0])
        threshold = tf.constant(min(round(self.rate * 2**32), 2**32 - 1), tf.uint32)
        salt = tf.constant(_py_fmix32(self.index * _GOLDEN + 1), tf.uint32)
        scale = tf.constant(1.0 / (1.0 - self.rate), x.dtype)
        kernel = _dropout_mask if self.xla else _dropout_mask_ops
        mask = kernel(tf.stop_gradient(x), tf.cast(seed, tf.int32), salt, threshold, scale)
        return x * mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "index": self.index}


def _subpixel_kernel_resize(kernel: tf.Tensor) -> tf.Tensor:
    """2x2 low-resolution kernel ``[2, 2, Cin, 4*Cout]`` equal to nearest x2 upsampling followed by
    a 3x3 "same" convolution with ``kernel`` (``[3, 3, Cin, Cout]``).

    Upsampled row ``2p+a`` reads low-resolution rows ``p-1, p`` (a = 0: taps w0 | w1+w2) or
    ``p, p+1`` (a = 1: taps w0+w1 | w2); each phase is a 2x2 window whose origin is shifted by
    ``a - 1`` rows (and ``b - 1`` columns).
    """
    rows = [[kernel[0], kernel[1] + kernel[2]], [kernel[0] + kernel[1], kernel[2]]]
    phases = []
    for a in range(2):
        r = tf.stack(rows[a])  # [2, 3, Cin, Cout]
        cols = [[r[:, 0], r[:, 1] + r[:, 2]], [r[:, 0] + r[:, 1], r[:, 2]]]
        for b in range(2):
            phases.append(tf.stack(cols[b], axis=1))
    return tf.concat(phases, axis=-1)


@keras.saving.register_keras_serializable(package="microsr_tf")
class SubPixelResizeConv2D(keras.layers.Layer):
    """Nearest-neighbour x2 upsampling then a 3x3 "same" convolution (no checkerboard artefacts),
    evaluated at the input resolution: one 2x2 convolution into ``4 * filters`` channels, a
    per-phase crop, and ``depth_to_space`` -- 16 instead of 36 multiply-adds per input pixel and
    channel pair.

    Weights have the layout of ``keras.layers.Conv2D(filters, 3, padding="same")`` applied after
    ``keras.layers.UpSampling2D(2)``, and the outputs are equal.
    """

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)

    def build(self, input_shape):
        cin = input_shape[-1]
        self.kernel = self.add_weight(name="kernel", shape=(3, 3, cin, self.filters),
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, x):
        h, w = tf.shape(x)[1], tf.shape(x)[2]
        y = tf.nn.conv2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), _subpixel_kernel_resize(self.kernel),
                         1, "VALID")  # [B, H+1, W+1, 4*Cout]
        f = self.filters
        phases = [y[:, a:a + h, b:b + w, (2 * a + b) * f:(2 * a + b + 1) * f] for a in range(2) for b in range(2)]
        y = tf.nn.depth_to_space(tf.concat(phases, axis=-1), 2)
        return tf.nn.bias_add(y, self.bias)

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        double = lambda n: None if n is None else 2 * n  # noqa: E731
        return (b, double(h), double(w), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}
