"""The CycleGAN ResNet generator with always-on Monte Carlo dropout, split into a deterministic
prefix (run once per input) and a stochastic suffix (run once per MC sample).

The suffix itself has two parts: the trunk part after the first dropout (at a quarter of the
resolution; only the dropout layer itself in the paper's "bottleneck" position) and the decoder
back to full resolution. With ``decoder_norm="none"`` the decoder holds no instance normalisation, so
each output pixel depends only on a small neighbourhood of the trunk output: the Monte Carlo engine
can run it in stripes of the slice with a halo and get exactly the whole-slice result.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from microsr_tf.config import DECODER_BLURS, DECODER_NORMS, DROPOUT_POSITIONS, INFERENCE_PRECISIONS, UPSAMPLE_KINDS
from microsr_tf.errors import ConfigError
from microsr_tf.models.dropout import MCDropout
from microsr_tf.models.head import OneChannelHead
from microsr_tf.models.normalization import InstanceNorm
from microsr_tf.models.padding import ReflectionPadding2D
from microsr_tf.models.upsampling import (BilinearResizeConv2D, BinomialBlur2D, Conv2DTranspose,
                                         SubPixelResizeConv2D)

DOWNSCALE = 4  # the trunk runs at 1/4 of the input resolution


def with_precision(generator: "ResnetGenerator", precision: str = "float32") -> "ResnetGenerator":
    """``generator`` itself for "float32"; for "bfloat16" a copy with its weights whose layers follow
    Keras' ``mixed_bfloat16`` policy: convolutions take bfloat16 activations and cast their float32
    weights on the fly, while instance-norm statistics, the one-channel head and the sigmoid output stay
    float32. CPUs with bfloat16 matrix units (AMX, AVX512-BF16) run those convolutions several times
    faster; outputs move by about 1e-3.
    """
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision must be one of {INFERENCE_PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return generator
    if not isinstance(generator, keras.Model):
        raise ConfigError(f"precision {precision!r} needs a Keras generator (.keras file or training run), "
                          f"not {type(generator).__name__}")
    if not generator.built:
        generator.build((None, None, None, 1))
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")  # layers take the global policy when constructed
    try:
        clone = type(generator).from_config(generator.get_config())
    finally:
        keras.config.set_dtype_policy(previous)
    clone.build((None, None, None, 1))
    clone.set_weights(generator.get_weights())
    clone.xla_kernels = generator.xla_kernels
    return clone


def _build_sequence(layers: Sequence[keras.layers.Layer], shape: tuple) -> tuple:
    """Build ``layers`` in order from ``shape`` (spatial dims may be None); return the output shape."""
    for layer in layers:
        if not layer.built:
            layer.build(shape)
        shape = layer.compute_output_shape(shape)
    return shape


def _apply(layers: Sequence[keras.layers.Layer], x: tf.Tensor) -> tf.Tensor:
    for layer in layers:
        x = layer(x)
    return x


@keras.saving.register_keras_serializable(package="microsr_tf")
class ResnetBlock(keras.layers.Layer):
    """Residual block: reflect pad, 3x3 conv, IN + ReLU, [MC dropout], reflect pad, 3x3 conv, IN, + skip.

    ``first_half`` ends right before the dropout so the block can be cut there for MC sampling.
    """

    def __init__(self, filters: int, dropout_rate: float = 0.0, dropout_index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.dropout_rate = float(dropout_rate)
        self.dropout_index = int(dropout_index)
        self.head = [ReflectionPadding2D(1), keras.layers.Conv2D(filters, 3), InstanceNorm(relu=True)]
        self.dropout = MCDropout(dropout_rate, dropout_index) if dropout_rate > 0 else None
        self.tail = [ReflectionPadding2D(1), keras.layers.Conv2D(filters, 3), InstanceNorm()]

    def build(self, input_shape):
        _build_sequence(self.tail, _build_sequence(self.head, input_shape))

    def first_half(self, x: tf.Tensor) -> tf.Tensor:
        return _apply(self.head, x)

    def second_half(self, x: tf.Tensor, h: tf.Tensor, seed: tf.Tensor | None = None) -> tf.Tensor:
        if self.dropout is not None:
            h = self.dropout(h, seed=seed)
        return x + _apply(self.tail, h)

    def call(self, x, seed=None):
        return self.second_half(x, self.first_half(x), seed)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "dropout_rate": self.dropout_rate,
                "dropout_index": self.dropout_index}


@keras.saving.register_keras_serializable(package="microsr_tf")
class ResnetGenerator(keras.Model):
    """ResNet image-to-image generator (CycleGAN), one channel in [0, 1] in and out.

    7x7 stem, two stride-2 convs, ``n_blocks`` residual blocks, two x2 upsamplings ("transpose":
    3x3 stride-2 transposed conv; "resize": nearest x2 + 3x3 conv; "bilinear": bilinear x2 + 3x3 conv),
    7x7 head and sigmoid, instance
    normalisation after every convolution of the encoder and the blocks, and after the upsamplings
    unless ``decoder_norm="none"``, and with ``decoder_blur="binomial"`` a fixed anti-aliasing blur after
    each upsampling's activation (:class:`BinomialBlur2D`). Height and width must be multiples of 4. MC dropout (``rate``) sits
    after the trunk ("bottleneck", the paper's single dropout layer), inside every residual block
    ("resblocks", as CycleGAN's ``use_dropout``) or nowhere ("none"); it is on in every call.

    ``xla_kernels`` (default True) compiles the fused instance-norm, head and dropout-mask kernels with
    XLA (fast on CPU); False traces them as plain ops with identical results, for graphs served by
    servers that do not compile XLA (exports set it). Set it before the first traced call.
    """

    def __init__(self, ngf: int = 64, n_blocks: int = 9, upsample: str = "transpose",
                 dropout_rate: float = 0.5, dropout_position: str = "bottleneck", decoder_norm: str = "instance",
                 decoder_blur: str = "none", **kwargs):
        super().__init__(**kwargs)
        if upsample not in UPSAMPLE_KINDS:
            raise ConfigError(f"model.upsample must be one of {UPSAMPLE_KINDS}, got {upsample!r}")
        if dropout_position not in DROPOUT_POSITIONS:
            raise ConfigError(f"model.dropout_position must be one of {DROPOUT_POSITIONS}, got {dropout_position!r}")
        if decoder_norm not in DECODER_NORMS:
            raise ConfigError(f"model.decoder_norm must be one of {DECODER_NORMS}, got {decoder_norm!r}")
        if decoder_blur not in DECODER_BLURS:
            raise ConfigError(f"model.decoder_blur must be one of {DECODER_BLURS}, got {decoder_blur!r}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ConfigError(f"model.dropout_rate must be in [0, 1), got {dropout_rate}")
        self.ngf, self.n_blocks, self.upsample = int(ngf), int(n_blocks), upsample
        self.dropout_rate, self.dropout_position = float(dropout_rate), dropout_position
        self.decoder_norm, self.decoder_blur = decoder_norm, decoder_blur
        # A zero rate or no blocks to hold the dropout means the network is deterministic.
        position = dropout_position if dropout_rate > 0 else "none"
        if position == "resblocks" and n_blocks == 0:
            position = "none"
        self._position = position

        self.encoder = [
            ReflectionPadding2D(3), keras.layers.Conv2D(ngf, 7), InstanceNorm(relu=True),
            keras.layers.Conv2D(2 * ngf, 3, strides=2, padding="same"), InstanceNorm(relu=True),
            keras.layers.Conv2D(4 * ngf, 3, strides=2, padding="same"), InstanceNorm(relu=True),
        ]
        block_rate = dropout_rate if position == "resblocks" else 0.0
        self.blocks = [ResnetBlock(4 * ngf, block_rate, dropout_index=i, name=f"block_{i}") for i in range(n_blocks)]
        self.bottleneck_dropout = MCDropout(dropout_rate, 0) if position == "bottleneck" else None
        self.decoder = []
        for filters in (2 * ngf, ngf):
            up = {"transpose": lambda: Conv2DTranspose(filters),
                  "resize": lambda: SubPixelResizeConv2D(filters),
                  "bilinear": lambda: BilinearResizeConv2D(filters)}[upsample]()
            self.decoder += [up, InstanceNorm(relu=True) if decoder_norm == "instance" else keras.layers.ReLU()]
            if decoder_blur == "binomial":
                self.decoder.append(BinomialBlur2D())
        self.decoder += [OneChannelHead(7), keras.layers.Activation("sigmoid", dtype="float32")]
        self.xla_kernels = True

    @property
    def xla_kernels(self) -> bool:
        """Whether the fused kernels and dropout masks are XLA-compiled; see the class docstring."""
        return self._xla_kernels

    @xla_kernels.setter
    def xla_kernels(self, value: bool) -> None:
        self._xla_kernels = bool(value)
        layers = list(self.encoder) + list(self.decoder)
        for block in self.blocks:
            layers += block.head + block.tail + [block.dropout]
        for layer in layers + [self.bottleneck_dropout]:
            if hasattr(layer, "xla"):
                layer.xla = self._xla_kernels

    @property
    def n_dropout_layers(self) -> int:
        """Number of MC dropout layers that actually drop (0 when deterministic)."""
        return {"none": 0, "bottleneck": 1, "resblocks": self.n_blocks}[self._position]

    @property
    def position(self) -> str:
        """Where the dropout that acts sits: "bottleneck", "resblocks", or "none" (deterministic)."""
        return self._position

    @property
    def local_decoder(self) -> bool:
        """Whether each output pixel depends only on trunk rows near its own (no normalisation in the
        decoder; :attr:`decoder_reach` says how near), so that the decoder can run in stripes with the
        same result."""
        return self.decoder_norm == "none"

    @property
    def decoder_reach(self) -> tuple[int, int]:
        """``(above, below)``: output rows ``4r .. 4r + 3`` of a local decoder read trunk rows ``r - above``
        to ``r + below`` (and nothing else).

        The 7x7 head reads output rows ``f - 3 .. f + 3``. The transposed convolution's output row ``2p``
        reads input rows ``p - 1, p`` and row ``2p + 1`` row ``p``; the resize upsampling's row ``2p`` reads
        ``p - 1, p`` and row ``2p + 1`` rows ``p, p + 1``; the bilinear upsampling's rows ``2p`` and ``2p + 1``
        both read ``p - 1 .. p + 1`` once its 3x3 convolution is counted. Composed over the two x2 stages:
        (2, 1), (2, 2) and (3, 3). The binomial blur after each stage reads one row more on either side of
        each stage's output; composed: (3, 2), (3, 3) and (3, 3).
        """
        if self.decoder_blur == "binomial":
            return {"transpose": (3, 2), "resize": (3, 3), "bilinear": (3, 3)}[self.upsample]
        return {"transpose": (2, 1), "resize": (2, 2), "bilinear": (3, 3)}[self.upsample]

    def build(self, input_shape):
        shape = _build_sequence(self.encoder, tuple(input_shape))
        shape = _build_sequence(self.blocks, shape)
        _build_sequence(self.decoder, shape)

    def _ensure_built(self, x: tf.Tensor) -> None:
        if not self.built:
            self.build(tuple(x.shape))

    def deterministic_prefix(self, x: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """Everything before the first dropout layer; the result may be tiled along the batch axis.

        "bottleneck": ``(trunk output,)``; "resblocks": ``(first block input, its hidden activation)``;
        "none": ``(generator output,)``.
        """
        x = tf.cast(x, tf.float32)
        self._ensure_built(x)
        h = _apply(self.encoder, x)
        if self._position == "resblocks":
            return h, self.blocks[0].first_half(h)
        for block in self.blocks:
            h = block(h)
        if self._position == "none":
            return (_apply(self.decoder, h),)
        return (h,)

    def trunk_suffix(self, features: Sequence[tf.Tensor], seed: tf.Tensor | None = None,
                     row_offset: int | tf.Tensor = 0) -> tf.Tensor:
        """The stochastic trunk from :meth:`deterministic_prefix`'s features up to the decoder's input.

        ``row_offset`` (bottleneck position only) says which row of the whole trunk output the first row
        of ``features`` is, so a full-width stripe draws the whole slice's dropout mask.
        """
        if self._position == "none":
            raise ValueError("a deterministic generator has no stochastic trunk")
        if self._position == "resblocks":
            x, hidden = features
            h = self.blocks[0].second_half(x, hidden, seed)
            for block in self.blocks[1:]:
                h = block(h, seed=seed)
            return h
        return self.bottleneck_dropout(features[0], seed=seed, row_offset=row_offset)

    def decode(self, h: tf.Tensor) -> tf.Tensor:
        """The decoder: trunk output (1/4 resolution) to the [0, 1] image."""
        return _apply(self.decoder, h)

    def stochastic_suffix(self, features: Sequence[tf.Tensor], seed: tf.Tensor | None = None) -> tf.Tensor:
        """The rest of the network from :meth:`deterministic_prefix`'s features; ``seed`` ``[B, 2]`` int32."""
        if self._position == "none":
            return features[0]
        return self.decode(self.trunk_suffix(features, seed))

    def call(self, x, seed=None):
        return self.stochastic_suffix(self.deterministic_prefix(x), seed)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (1,)

    @property
    def hidden_bytes_per_pixel(self) -> int:
        """Memory per output pixel of one pass that traced graphs do not show (the fused head's temporaries):
        the Monte Carlo engine adds it to what it estimates from the graphs."""
        return sum(getattr(layer, "working_bytes_per_pixel", 0) for layer in self.decoder)

    def flops_per_pixel(self) -> dict[str, int]:
        """Multiply-adds per output pixel of the convolutions in the prefix and in the suffix (as
        implemented: the resize upsampling costs 16 instead of 9 per low-resolution pixel)."""
        ngf = self.ngf
        up_taps = {"transpose": 9, "resize": 16, "bilinear": 36}[self.upsample]
        costs = [49 * ngf, 9 * ngf * 2 * ngf / 4, 9 * 2 * ngf * 4 * ngf / 16]  # stem, two downsamplings
        block_conv = 9 * (4 * ngf) ** 2 / 16
        costs += [block_conv] * (2 * self.n_blocks)
        costs += [up_taps * 4 * ngf * 2 * ngf / 16, up_taps * 2 * ngf * ngf / 4, 49 * ngf]
        if self.decoder_blur == "binomial":  # 9 taps per channel after each upsampling
            costs += [9 * 2 * ngf / 4, 9 * ngf]
        split = {"none": len(costs), "bottleneck": 3 + 2 * self.n_blocks, "resblocks": 4}[self._position]
        return {"prefix": round(sum(costs[:split])), "suffix": round(sum(costs[split:]))}

    def get_config(self):
        return {**super().get_config(), "ngf": self.ngf, "n_blocks": self.n_blocks, "upsample": self.upsample,
                "dropout_rate": self.dropout_rate, "dropout_position": self.dropout_position,
                "decoder_norm": self.decoder_norm, "decoder_blur": self.decoder_blur}
