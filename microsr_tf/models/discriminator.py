"""The PatchGAN critic: classifies overlapping patches (70x70 with three stride-2 layers) as real
or generated, and returns logits so the loss chooses log or least-squares GAN."""

from __future__ import annotations

import keras

from microsr_tf.errors import ConfigError
from microsr_tf.models.normalization import instance_norm


@keras.saving.register_keras_serializable(package="microsr_tf")
class PatchDiscriminator(keras.Model):
    """4x4 convs with one pixel of zero padding: ``ndf`` (stride 2, no norm), then ``n_layers - 1``
    more stride-2 layers doubling the filters (capped at 8 ndf), one stride-1 layer and a stride-1
    conv to one logit per patch. LeakyReLU 0.2 and instance norm between layers; no norm or
    activation on the output. A 256 px input gives 30x30 logits, each seeing 70x70 pixels."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, **kwargs):
        super().__init__(**kwargs)
        if ndf < 1 or n_layers < 1:
            raise ConfigError(f"PatchDiscriminator needs ndf >= 1 and n_layers >= 1, got {ndf}, {n_layers}")
        self.ndf, self.n_layers = int(ndf), int(n_layers)
        pad = keras.layers.ZeroPadding2D
        conv = lambda filters, stride: keras.layers.Conv2D(filters, 4, strides=stride)  # noqa: E731
        self.body = [pad(1), conv(ndf, 2), keras.layers.LeakyReLU(0.2)]
        for i in range(1, n_layers + 1):
            filters = ndf * min(2**i, 8)
            self.body += [pad(1), conv(filters, 2 if i < n_layers else 1), instance_norm(),
                          keras.layers.LeakyReLU(0.2)]
        self.body += [pad(1), keras.layers.Conv2D(1, 4, dtype="float32")]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.body:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)

    def call(self, x):
        for layer in self.body:
            x = layer(x)
        return x

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.body:
            shape = layer.compute_output_shape(shape)
        return shape

    def get_config(self):
        return {**super().get_config(), "ndf": self.ndf, "n_layers": self.n_layers}
