"""What the deterministic baselines (U-Net, SRGAN) share: the Monte Carlo generator interface of a
network without dropout, and the residual output on the bicubic input.

The Monte Carlo engine (:mod:`microsr_tf.inference.mc`) runs ``deterministic_prefix`` once per input
and ``stochastic_suffix`` once per sample; for a network with nothing random the prefix is the whole
network and the suffix hands its output back, so ``T`` samples cost one pass and agree exactly.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

_DUMMY_SIDE = 8  # the smallest input a build pass can use (a multiple of 4)


def residual_output(x: tf.Tensor, residual: tf.Tensor) -> tf.Tensor:
    """``clip(x + residual, 0, 1)`` in float32: the bicubic input plus the predicted detail.

    The baselines' heads start at zero weights, so an untrained network returns its bicubic input
    and training starts from bicubic quality (the rest of the network gets gradients from the first
    step on, once the head has moved).
    """
    return tf.clip_by_value(tf.cast(x, tf.float32) + tf.cast(residual, tf.float32), 0.0, 1.0)


class DeterministicGenerator(keras.Model):
    """The generator interface of a network without dropout, so T Monte Carlo samples cost one pass.

    ``deterministic_prefix(x)`` is the whole network in inference mode and returns ``(output,)``;
    ``stochastic_suffix(features, seed)`` returns ``features[0]``. Subclasses implement
    ``forward(x, training)``.
    """

    n_dropout_layers = 0  # no dropout: the Monte Carlo variance is zero
    xla_kernels = False  # no XLA-fused kernels; the attribute is copied by with_precision / float32_generator

    def forward(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        raise NotImplementedError

    def build(self, input_shape):
        # One pass on a small dummy image creates every weight (sub-layers build on first call).
        self.forward(tf.zeros((1, _DUMMY_SIDE, _DUMMY_SIDE, 1)), training=False)

    def deterministic_prefix(self, x: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """The whole network, in inference mode: ``(output,)``."""
        x = tf.cast(x, tf.float32)
        if not self.built:
            self.build(tuple(x.shape))
            self.built = True
        return (self.forward(x, training=False),)

    def stochastic_suffix(self, features: Sequence[tf.Tensor], seed: tf.Tensor | None = None) -> tf.Tensor:
        """Nothing is random: the prefix's output, whatever the seed."""
        return features[0]

    def call(self, x, seed=None, training=None):
        return self.forward(tf.cast(x, tf.float32), training=bool(training))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (1,)
