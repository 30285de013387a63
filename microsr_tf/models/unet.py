"""The U-Net baseline of the paper's comparison (Ronneberger et al., MICCAI 2015), as a deterministic
generator with the Monte Carlo interface of :class:`~microsr_tf.models.generator.ResnetGenerator`.

An encoder of two levels (two 3x3 convs + ReLU, then 2x2 max pooling), a bottleneck, and a decoder
of up-convolutions that halve the channels, whose outputs are concatenated with the encoder's
features at the same scale (the skip connections) before two more 3x3 convs; a 1x1 conv gives one
channel. The up-convolution is nearest x2 upsampling and a 3x3 conv (the resize-convolution of Odena
et al., 2016) rather than a 2x2 transposed conv: with transposed convs a 300-step phantom run printed
a 2 px period into its output (``microsr-tf evaluate``'s periodic-2px score 22.6, bicubic 1.45). Two poolings keep it
valid for any height and width that is a multiple of 4, like the CycleGAN generator, whose two
stride-2 convs it mirrors in size (``filters``, ``2 filters``, ``4 filters`` at the bottleneck).

Input and output are on the same HR grid: the network takes the bicubic-upsampled LR slice and adds
its prediction to it (the global residual of FBPConvNet, Jin et al. 2017, a U-Net for CT
restoration), clipped to [0, 1]. "same" zero padding keeps the size; there is no normalisation
layer, so the output of a pixel depends only on its receptive field, not on the tile it was cut
from.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from microsr_tf.errors import ConfigError
from microsr_tf.models.deterministic import DeterministicGenerator, residual_output


@keras.saving.register_keras_serializable(package="microsr_tf")
class UNetGenerator(DeterministicGenerator):
    """Two-level U-Net with skip connections and a global residual; one channel in [0, 1] in and out.

    ``filters`` at full resolution, doubling per level (``4 filters`` at the bottleneck, a quarter of
    the resolution). Height and width must be multiples of 4.
    """

    levels = 2

    def __init__(self, filters: int = 64, **kwargs):
        super().__init__(**kwargs)
        if filters < 1:
            raise ConfigError(f"U-Net filters must be positive, got {filters}")
        self.filters = int(filters)

        def double_conv(n: int, name: str) -> keras.Sequential:
            return keras.Sequential([keras.layers.Conv2D(n, 3, padding="same", activation="relu", name=f"{name}_conv{i}")
                                     for i in (1, 2)], name=name)

        self.down = [double_conv(self.filters * 2**i, f"down{i}") for i in range(self.levels)]
        self.pool = keras.layers.MaxPooling2D(2)
        self.bottom = double_conv(self.filters * 2**self.levels, "bottom")
        self.up = [keras.Sequential([keras.layers.UpSampling2D(2),
                                     keras.layers.Conv2D(self.filters * 2**i, 3, padding="same", name=f"upconv{i}_conv")],
                                    name=f"upconv{i}") for i in range(self.levels)]
        self.merge = [double_conv(self.filters * 2**i, f"up{i}") for i in range(self.levels)]
        self.head = keras.layers.Conv2D(1, 1, kernel_initializer="zeros", dtype="float32", name="head")

    def forward(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        h, skips = x, []
        for convs in self.down:
            h = convs(h)
            skips.append(h)
            h = self.pool(h)
        h = self.bottom(h)
        for level in reversed(range(self.levels)):
            h = self.up[level](h)
            h = self.merge[level](tf.concat([tf.cast(skips[level], h.dtype), h], axis=-1))
        return residual_output(x, self.head(h))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}
