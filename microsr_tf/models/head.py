"""The generator's output head: reflection padding and a ``k x k`` convolution into one channel, fused."""

from __future__ import annotations

import keras
import tensorflow as tf


def _head_ops(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
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


_head_xla = tf.function(_head_ops, jit_compile=True, reduce_retracing=True)


@keras.saving.register_keras_serializable(package="microsr_tf")
class OneChannelHead(keras.layers.Layer):
    """``Conv2D(1, k)`` after ``ReflectionPadding2D(k // 2)``: a "same"-size, one-channel output with bias.

    A convolution into a single channel keeps the vector units of a standard kernel mostly idle; this
    form runs the work as a matrix product and is ~4x faster on CPU, equal to float rounding. The result
    is float32 (it feeds the float32 output activation). ``xla`` as in
    :class:`~microsr_tf.models.normalization.InstanceNorm`.
    """

    xla = True

    def __init__(self, kernel_size: int = 7, **kwargs):
        super().__init__(**kwargs)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.kernel_size = int(kernel_size)

    def build(self, input_shape):
        k = self.kernel_size
        self.kernel = self.add_weight(name="kernel", shape=(k, k, input_shape[-1], 1), initializer="glorot_uniform",
                                      autocast=False)
        self.bias = self.add_weight(name="bias", shape=(1,), initializer="zeros", autocast=False)

    def call(self, x):
        kernel = _head_xla if self.xla else _head_ops
        return kernel(x, tf.cast(self.kernel, tf.float32), tf.cast(self.bias, tf.float32))

    @property
    def working_bytes_per_pixel(self) -> int:
        """Float32 temporaries per output pixel that the fused kernel holds and a traced graph does not show
        (XLA allocates them inside one op): the ``k*k`` tap planes, padded, and ``k`` row sums."""
        k = self.kernel_size
        return 4 * (2 * k * k + k)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (1,)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}
