"""Learned x2 upsampling without checkerboard artefacts: nearest-neighbour resize then a 3x3
convolution, computed at the input resolution (sub-pixel form)."""

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


@keras.saving.register_keras_serializable(package="microsr_tf")
class BilinearResizeConv2D(keras.layers.Layer):
    """Bilinear x2 upsampling then a 3x3 "same" convolution: the resize-convolution of Odena et al. (2016)
    with a smooth interpolant, so no pixel of the coarser grid is copied as a block into the finer one
    (nearest-neighbour resizing leaves a faint 2-pixel lattice that an adversarial loss can amplify)."""

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.conv = keras.layers.Conv2D(self.filters, 3, padding="same")

    def build(self, input_shape):
        self.conv.build(self.compute_output_shape(input_shape)[:3] + (input_shape[-1],))

    def call(self, x):
        size = 2 * tf.shape(x)[1:3]  # dynamic: the generator runs on slices of any size
        return self.conv(tf.cast(tf.image.resize(x, size, method="bilinear"), x.dtype))

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        double = lambda n: None if n is None else 2 * n  # noqa: E731
        return (b, double(h), double(w), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}
