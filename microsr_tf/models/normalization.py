"""Instance normalisation: the generator's fused layer, and the Keras layer the critics use.

The generator normalises with :class:`InstanceNorm`, one kernel for statistics, scale, offset and an
optional ReLU (about 3x faster on CPU than Keras' ``GroupNormalization``, which reduces over a 5-D
grouped view in separate passes), and one kernel for its gradient. It computes exactly what
``GroupNormalization(groups=-1)`` followed by a ReLU computes: per (example, channel) statistics over
height and width.
"""

from __future__ import annotations

import keras
import tensorflow as tf

EPSILON = 1e-5


def instance_norm(name: str | None = None) -> keras.layers.GroupNormalization:
    """Keras' instance normalisation (one group per channel, learned scale and offset), for the critics."""
    return keras.layers.GroupNormalization(groups=-1, epsilon=EPSILON, name=name)


def _forward_ops(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float, relu: bool):
    """Per-(example, channel) normalisation over height and width, scale, offset and optional ReLU, with the
    mean and 1 / std it used. Statistics and arithmetic are float32 whatever ``x``'s dtype; the result has
    ``x``'s dtype."""
    dtype = x.dtype
    x = tf.cast(x, tf.float32)
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    inv = tf.math.rsqrt(tf.reduce_mean(tf.square(x - mean), axis=[1, 2], keepdims=True) + epsilon)
    y = (x - mean) * (gamma * inv) + beta
    return tf.cast(tf.nn.relu(y) if relu else y, dtype), mean, inv


def _instance_norm_ops(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float, relu: bool) -> tf.Tensor:
    """The normalised output of :func:`_forward_ops` as plain ops (the statistics are pruned from the graph)."""
    return _forward_ops(x, gamma, beta, epsilon, relu)[0]


def _backward_ops(dy, x, y, mean, inv, gamma, relu: bool):
    """Gradients of :func:`_forward_ops`'s output with respect to ``x``, ``gamma`` and ``beta`` in one pass
    over the activations: with ``g`` the gradient after the ReLU and ``x̂`` the normalised input,
    ``dx = γ / σ · (g − mean(g) − x̂ · mean(g · x̂))`` over height and width."""
    g = tf.cast(dy, tf.float32)
    if relu:
        g = tf.where(y > 0, g, 0.0)
    xhat = (tf.cast(x, tf.float32) - mean) * inv
    g_mean = tf.reduce_mean(g, axis=[1, 2], keepdims=True)
    gx_mean = tf.reduce_mean(g * xhat, axis=[1, 2], keepdims=True)
    dx = (gamma * inv) * (g - g_mean - xhat * gx_mean)
    count = tf.cast(tf.shape(x)[1] * tf.shape(x)[2], tf.float32)
    d_gamma = tf.reduce_sum(gx_mean, axis=[0, 1, 2]) * count
    d_beta = tf.reduce_sum(g_mean, axis=[0, 1, 2]) * count
    return tf.cast(dx, x.dtype), d_gamma, d_beta


_forward_xla = tf.function(_forward_ops, jit_compile=True, reduce_retracing=True)
_backward_xla = tf.function(_backward_ops, jit_compile=True, reduce_retracing=True)


def _instance_norm_xla(x, gamma, beta, epsilon: float, relu: bool):
    """:func:`_instance_norm_ops` as one XLA kernel, with its gradient as another: XLA's own derivative of
    the forward kernel takes about twice as long as the plain ops' derivative, this one about as long
    as the forward pass."""

    @tf.custom_gradient
    def norm(x, gamma, beta):
        y, mean, inv = _forward_xla(x, gamma, beta, epsilon, relu)
        return y, lambda dy: _backward_xla(dy, x, y, mean, inv, gamma, relu)

    return norm(x, gamma, beta)


@keras.saving.register_keras_serializable(package="microsr_tf")
class InstanceNorm(keras.layers.Layer):
    """Instance normalisation with learned scale (``gamma``) and offset (``beta``), then ReLU if ``relu``.

    ``xla`` (True) runs the computation as one XLA-compiled kernel: two reduction passes and one
    elementwise pass; False traces the same ops uncompiled (for graphs served without XLA), with equal
    results.
    """

    xla = True

    def __init__(self, relu: bool = False, epsilon: float = EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.relu = bool(relu)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        # Weights are read in float32 even under a mixed-precision policy: the kernel computes in float32.
        channels = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones", autocast=False)
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros", autocast=False)

    def call(self, x):
        kernel = _instance_norm_xla if self.xla else _instance_norm_ops
        return kernel(x, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32), self.epsilon, self.relu)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "relu": self.relu, "epsilon": self.epsilon}
