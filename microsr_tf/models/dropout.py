"""Monte Carlo dropout that is always on, and the one dropout-seed convention of the project.

Masks come from a counter-based hash (the murmur3 finaliser) of ``(seed row, layer index, element
position)``, so a sample is a pure function of its seed row and whole batches of differently seeded
samples are drawn in one pass. The element position is its index in the whole image, so a crop of an
image (a stripe of a slice) can draw exactly the mask the whole image would (``MCDropout.call``'s
``row_offset``).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive integers over the 32-bit range
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
MAX_SEED = _INT32_MAX  # seeds are non-negative int32


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
    """:func:`_fmix32` on a Python int."""
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def image_seeds(seed: int, n: int) -> np.ndarray:
    """``[n]`` int32 dropout seeds of the images of a batch predicted with one base ``seed``.

    The one convention of library, CLI and served signatures: image 0 uses ``seed`` itself (so a
    single slice sent with a seed equals a local prediction of that slice with that seed) and image
    ``b > 0`` uses ``fmix32(seed ^ fmix32(b * golden)) >> 1``, a 31-bit hash that never wraps out of
    range. :func:`image_seeds_tf` computes the same in a graph.
    """
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


def _dropout_mask_ops(x: tf.Tensor, seed: tf.Tensor, salt: tf.Tensor, threshold: tf.Tensor, scale: tf.Tensor,
                      row_offset: tf.Tensor) -> tf.Tensor:
    """Inverted-dropout mask shaped like ``x``: 0 or ``scale``; row ``i`` depends only on ``seed[i]``,
    ``salt`` (the layer) and each element's position ``((row_offset + r) * W + c) * C + k`` in the whole
    image (``x`` holds rows ``row_offset ...`` of it, at full width). Elements are kept where their 32-bit
    hash is at least ``threshold``. The constants are tensors so that one trace serves all layers."""
    shape = tf.shape(x)
    per_example = tf.reduce_prod(shape[1:])
    s = tf.bitcast(seed, tf.uint32)
    key = _fmix32(tf.bitwise.bitwise_xor(s[:, 0], salt))
    key = _fmix32(tf.bitwise.bitwise_xor(key, s[:, 1]) + tf.constant(_GOLDEN, tf.uint32))
    start = tf.cast(row_offset, tf.int32) * shape[2] * shape[3]
    position = _fmix32(tf.bitcast(tf.range(per_example) + start, tf.uint32))
    bits = _fmix32(tf.bitwise.bitwise_xor(position[None, :], key[:, None]))
    mask = tf.where(bits >= threshold, scale, tf.zeros([], x.dtype))
    return tf.reshape(mask, shape)


_dropout_mask = tf.function(_dropout_mask_ops, jit_compile=True, reduce_retracing=True)


@keras.saving.register_keras_serializable(package="microsr_tf")
class MCDropout(keras.layers.Layer):
    """Dropout that is always on (training, inference and exported graphs), for MC sampling.

    ``call(x, seed, row_offset)``: ``seed`` is an int32 ``[B, 2]`` tensor, one row per example; example
    ``i``'s mask depends only on ``seed[i]``, this layer's ``index`` and the element positions, so equal
    seeds give bit-identical samples. ``row_offset`` says which row of the whole image ``x``'s first row
    is (a full-width stripe draws the whole image's mask there). Without a seed each call draws fresh
    masks. ``xla`` (True) compiles the mask with XLA; False uses plain ops with identical results.
    """

    xla = True

    def __init__(self, rate: float, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.index = int(index)

    def call(self, x, seed=None, row_offset=0):
        if self.rate == 0.0:
            return x
        if seed is None:
            seed = _random_seeds(tf.shape(x)[0])
        threshold = tf.constant(min(round(self.rate * 2**32), 2**32 - 1), tf.uint32)
        salt = tf.constant(_py_fmix32(self.index * _GOLDEN + 1), tf.uint32)
        scale = tf.constant(1.0 / (1.0 - self.rate), x.dtype)
        kernel = _dropout_mask if self.xla else _dropout_mask_ops
        mask = kernel(tf.stop_gradient(x), tf.cast(seed, tf.int32), salt, threshold, scale,
                      tf.cast(row_offset, tf.int32))
        return x * mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "index": self.index}
