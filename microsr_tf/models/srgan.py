"""The SRGAN baseline of the paper's comparison (Ledig et al., CVPR 2017): the SRResNet generator and
the SRGAN critic, adapted to inputs that are already on the HR grid.

Generator (SRResNet): a 9x9 conv + PReLU, ``n_blocks`` residual blocks (3x3 conv, batch norm, PReLU,
3x3 conv, batch norm, + skip), a 3x3 conv + batch norm added to the first features (the long skip),
and a 9x9 conv to one channel. Ledig's two pixel-shuffle x2 upsamplings are left out: as in the
paper's comparison, the LR slice is bicubic-upsampled to the HR voxel size first, so input and output
share one grid and the network adds its prediction to the bicubic input, clipped to [0, 1] (as the
U-Net baseline). Batch norm uses batch statistics while training and its moving averages in
inference, so a prediction is a fixed per-channel affine map and does not depend on the tile.

Critic: Ledig's eight 3x3 convs (``ndf``, ``ndf``, ``2 ndf``, ``2 ndf``, ``4 ndf``, ``4 ndf``,
``8 ndf``, ``8 ndf``; strides 1, 2 alternating; batch norm after all but the first; LeakyReLU 0.2),
then dense ``16 ndf`` units, LeakyReLU and one logit. Global average pooling replaces the flattening
before the dense layer: at 256 px Ledig's flattened 16x16x512 features into 1024 units would be 134 M
weights, and pooling keeps the critic independent of the patch size.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from microsr_tf.errors import ConfigError
from microsr_tf.models.deterministic import DeterministicGenerator, residual_output


def _prelu(name: str) -> keras.layers.PReLU:
    """PReLU with one learned slope per channel (Ledig's parametric ReLU), any spatial size."""
    return keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2], name=name)


def _batch_norm_aware(layers: list[keras.layers.Layer], h: tf.Tensor, training: bool) -> tf.Tensor:
    """Run ``layers`` in order, telling batch norm whether it is training."""
    for layer in layers:
        h = layer(h, training=training) if isinstance(layer, keras.layers.BatchNormalization) else layer(h)
    return h


@keras.saving.register_keras_serializable(package="microsr_tf")
class SRResidualBlock(keras.layers.Layer):
    """Ledig's residual block: 3x3 conv, batch norm, PReLU, 3x3 conv, batch norm, + skip."""

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.body = [keras.layers.Conv2D(self.filters, 3, padding="same"), keras.layers.BatchNormalization(),
                     _prelu("prelu"), keras.layers.Conv2D(self.filters, 3, padding="same"),
                     keras.layers.BatchNormalization()]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.body:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)

    def call(self, x, training=None):
        return x + _batch_norm_aware(self.body, x, bool(training))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="microsr_tf")
class SRResNetGenerator(DeterministicGenerator):
    """SRGAN's residual generator on the HR grid; one channel in [0, 1] in and out, any size.

    ``filters`` in every layer (Ledig: 64), ``n_blocks`` residual blocks (Ledig: 16).
    """

    def __init__(self, filters: int = 64, n_blocks: int = 9, **kwargs):
        super().__init__(**kwargs)
        if filters < 1 or n_blocks < 0:
            raise ConfigError(f"SRResNet needs filters >= 1 and n_blocks >= 0, got {filters}, {n_blocks}")
        self.filters, self.n_blocks = int(filters), int(n_blocks)
        conv = lambda k, name: keras.layers.Conv2D(self.filters, k, padding="same", name=name)  # noqa: E731
        self.stem = [conv(9, "stem_conv"), _prelu("stem_prelu")]
        self.blocks = [SRResidualBlock(self.filters, name=f"block{i}") for i in range(self.n_blocks)]
        self.trunk_end = [conv(3, "trunk_conv"), keras.layers.BatchNormalization(name="trunk_bn")]
        self.head = keras.layers.Conv2D(1, 9, padding="same", kernel_initializer="zeros", dtype="float32",
                                       name="head")

    def forward(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        first = _batch_norm_aware(self.stem, x, training)
        h = first
        for block in self.blocks:
            h = block(h, training=training)
        h = first + _batch_norm_aware(self.trunk_end, h, training)
        return residual_output(x, self.head(h))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "n_blocks": self.n_blocks}


@keras.saving.register_keras_serializable(package="microsr_tf")
class SRGANCritic(keras.Model):
    """Ledig's critic with global average pooling: one real/fake logit per image, any size >= 16 px."""

    def __init__(self, ndf: int = 64, **kwargs):
        super().__init__(**kwargs)
        if ndf < 1:
            raise ConfigError(f"SRGAN critic needs ndf >= 1, got {ndf}")
        self.ndf = int(ndf)
        self.body: list[keras.layers.Layer] = []
        for i, (mult, stride) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2)]):
            self.body.append(keras.layers.Conv2D(self.ndf * mult, 3, strides=stride, padding="same", name=f"conv{i}"))
            if i > 0:
                self.body.append(keras.layers.BatchNormalization(name=f"bn{i}"))
            self.body.append(keras.layers.LeakyReLU(0.2))
        self.body += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(16 * self.ndf, name="dense"),
                      keras.layers.LeakyReLU(0.2), keras.layers.Dense(1, dtype="float32", name="logit")]

    def build(self, input_shape):
        self.call(tf.zeros((1, 16, 16, 1)))

    def call(self, x, training=None):
        return _batch_norm_aware(self.body, x, bool(training))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1)

    def get_config(self):
        return {**super().get_config(), "ndf": self.ndf}
