"""Learned x2 upsampling layers: nearest-neighbour or bilinear resize then a 3x3 convolution (no
checkerboard artefacts), and the paper's transposed convolution with a faster bfloat16 form; and the
fixed binomial blur that can follow each upsampling's activation (anti-aliasing)."""

from __future__ import annotations

import keras
import tensorflow as tf


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


class _Upsample2x(keras.layers.Layer):
    """A layer that doubles height and width and outputs ``filters`` channels."""

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        double = lambda n: None if n is None else 2 * n  # noqa: E731
        return (b, double(h), double(w), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="microsr_tf")
class SubPixelResizeConv2D(_Upsample2x):
    """Nearest-neighbour x2 upsampling then a 3x3 "same" convolution (no checkerboard artefacts),
    evaluated at the input resolution: one 2x2 convolution into ``4 * filters`` channels, a
    per-phase crop, and ``depth_to_space`` -- 16 instead of 36 multiply-adds per input pixel and
    channel pair.

    Weights have the layout of ``keras.layers.Conv2D(filters, 3, padding="same")`` applied after
    ``keras.layers.UpSampling2D(2)``, and the outputs are equal.
    """

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



@keras.saving.register_keras_serializable(package="microsr_tf")
class BilinearResizeConv2D(_Upsample2x):
    """Bilinear x2 upsampling then a 3x3 "same" convolution: the resize-convolution of Odena et al. (2016)
    with a smooth interpolant, so no pixel of the coarser grid is copied as a block into the finer one
    (nearest-neighbour resizing leaves a faint 2-pixel lattice that an adversarial loss can amplify)."""

    def __init__(self, filters: int, **kwargs):
        super().__init__(filters, **kwargs)
        self.conv = keras.layers.Conv2D(self.filters, 3, padding="same")

    def build(self, input_shape):
        self.conv.build(self.compute_output_shape(input_shape)[:3] + (input_shape[-1],))

    def call(self, x):
        size = 2 * tf.shape(x)[1:3]  # dynamic: the generator runs on slices of any size
        return self.conv(tf.cast(tf.image.resize(x, size, method="bilinear"), x.dtype))


@keras.saving.register_keras_serializable(package="microsr_tf")
class BinomialBlur2D(keras.layers.Layer):
    """Fixed ``[1, 2, 1] / 4`` blur along height and width, per channel, with mirrored edges.

    Its response ``cos^2(pi f)`` is exactly zero at the Nyquist frequency. A trained generator prints a
    faint 2-pixel stripe pattern even on a constant input; the likely source (not isolated) is that every
    x2 upsampling makes the statistics of its output alternate between even and odd pixels and the
    activation after it turns that into an alternating mean. Blurring after the activation removes the
    Nyquist component there (anti-aliasing after the non-linearity, as in alias-free GANs); the following
    linear convolution cannot bring it back. Trainable weights: none.
    """

    def call(self, x):
        x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
        x = 0.25 * x[:, :-2] + 0.5 * x[:, 1:-1] + 0.25 * x[:, 2:]
        return 0.25 * x[:, :, :-2] + 0.5 * x[:, :, 1:-1] + 0.25 * x[:, :, 2:]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


def _phase_kernels(kernel: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The four sub-pixel kernels of a 3x3 stride-2 "same" transposed convolution (``[3, 3, Cout, Cin]``).

    Output row ``2p`` takes input rows ``p - 1`` (tap 2) and ``p`` (tap 0), output row ``2p + 1`` input
    row ``p`` (tap 1); columns alike. Returns the ``[rows, cols, Cin, Cout]`` kernels of the output phases
    (even, even), (even, odd), (odd, even), (odd, odd): 2x2, 2x1, 1x2 and 1x1, nine taps in all.
    """
    k = tf.transpose(kernel, [0, 1, 3, 2])
    even_even = tf.stack([tf.stack([k[2, 2], k[2, 0]]), tf.stack([k[0, 2], k[0, 0]])])
    even_odd = tf.stack([k[2, 1], k[0, 1]])[:, None]
    odd_even = tf.stack([k[1, 2], k[1, 0]])[None]
    return even_even, even_odd, odd_even, k[1:2, 1:2]


def _sub_pixel_transpose(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """A 3x3 stride-2 "same" transposed convolution with bias as its four output phases (see
    :func:`_phase_kernels`): four small convolutions at the input resolution, interleaved."""

    def phase(k, top, left):  # zero row p - 1 / column q - 1 before the first, padded by oneDNN
        y = tf.nn.conv2d(x, tf.cast(k, x.dtype), 1, [[0, 0], [top, 0], [left, 0], [0, 0]])
        return tf.nn.bias_add(y, bias)  # fused into the convolution

    even_even, even_odd, odd_even, odd_odd = _phase_kernels(kernel)
    phases = [phase(even_even, 1, 1), phase(even_odd, 1, 0), phase(odd_even, 0, 1), phase(odd_odd, 0, 0)]
    return tf.nn.depth_to_space(tf.concat(phases, axis=-1), 2)


@tf.custom_gradient
def _sub_pixel_transpose_trainable(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor):
    """:func:`_sub_pixel_transpose` whose gradient is the transposed convolution's own: the adjoint
    stride-2 convolution and oneDNN's filter gradient. Differentiating the sub-pixel form itself (four
    explicitly padded convolutions, a concatenation and ``depth_to_space``) makes a bfloat16 training step
    about 2.5x slower than this."""
    y = _sub_pixel_transpose(x, kernel, bias)

    def grad(dy):
        dy = tf.cast(dy, x.dtype)
        dx = tf.nn.conv2d(dy, kernel, 2, "SAME")
        dk = tf.raw_ops.Conv2DBackpropFilter(input=dy, filter_sizes=tf.shape(kernel), out_backprop=x,
                                             strides=[1, 2, 2, 1], padding="SAME")
        return dx, dk, tf.reduce_sum(dy, axis=[0, 1, 2])

    return y, grad


@keras.saving.register_keras_serializable(package="microsr_tf")
class Conv2DTranspose(keras.layers.Conv2DTranspose):
    """x2 upsampling by a 3x3 stride-2 "same" transposed convolution with bias: exactly
    ``keras.layers.Conv2DTranspose(filters, 3, strides=2, padding="same")``, same weights. It carries
    Keras' class name because a ``.keras`` archive files a layer's weights under its class name, so
    generators saved with Keras' layer load into this one.

    In bfloat16 it is computed in sub-pixel form: the four output phases as four small convolutions at
    the input resolution (the nine taps, nothing multiplied by an inserted zero) interleaved by
    ``depth_to_space``. oneDNN runs that ~3x faster than its bfloat16 transposed convolution; in float32
    its transposed convolution is as fast, so float32 keeps it. Both are the same sums in another order.
    Its gradient is the transposed convolution's (:func:`_sub_pixel_transpose_trainable`).
    """

    def __init__(self, filters: int, **kwargs):
        for key in ("kernel_size", "strides", "padding"):
            kwargs.pop(key, None)
        super().__init__(filters, 3, strides=2, padding="same", **kwargs)

    def call(self, x):
        if self.compute_dtype != "bfloat16" or self.data_format != "channels_last":
            return super().call(x)
        return _sub_pixel_transpose_trainable(x, tf.cast(self.kernel, x.dtype), tf.cast(self.bias, x.dtype))

    def get_config(self):
        config = super().get_config()
        for key in ("kernel_size", "strides", "padding"):
            config.pop(key, None)
        return config
