"""One seed convention for library, CLI and served signatures, and exports that need no XLA."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from microsr_tf.inference.mc import MonteCarloPredictor
from microsr_tf.models.generator import ResnetGenerator
from microsr_tf.models.dropout import image_seeds, image_seeds_tf

MAX = 2**31 - 1


def _fmix32(h: int) -> int:
    """Murmur3's finaliser, written out again from its published constants."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % 2**32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


@pytest.mark.parametrize("seed", [0, 1, 12345, MAX - 1, MAX])
def test_image_seeds_follow_the_documented_formula_in_numpy_and_in_graphs(seed):
    n = 5
    expected = [seed] + [_fmix32(seed ^ _fmix32((b * 0x9E3779B9) % 2**32)) >> 1 for b in range(1, n)]
    np.testing.assert_array_equal(image_seeds(seed, n), expected)
    np.testing.assert_array_equal(image_seeds_tf(tf.constant(seed, tf.int32), tf.constant(n)).numpy(), expected)
    assert all(0 <= s <= MAX for s in expected)  # no wrap into negative seeds near 2^31


def test_a_base_seed_gives_each_image_of_a_batch_its_own_masks():
    gen = ResnetGenerator(ngf=4, n_blocks=1, dropout_position="bottleneck")
    one = np.random.default_rng(0).random((1, 16, 16, 1), np.float32)
    x = np.repeat(one, 3, axis=0)  # three identical images
    result = MonteCarloPredictor(gen, samples=4).predict(x, seed=7)
    assert not np.allclose(result.mean[0], result.mean[1])
    # image b equals the same image predicted alone with its per-image seed
    alone = MonteCarloPredictor(gen, samples=4).predict(x[1:2], seed=int(image_seeds(7, 3)[1]))
    np.testing.assert_allclose(result.mean[1], alone.mean[0], atol=1e-6)
    first = MonteCarloPredictor(gen, samples=4).predict(x[:1], seed=7)
    np.testing.assert_allclose(result.mean[0], first.mean[0], atol=1e-6)


@pytest.mark.parametrize("position", ["bottleneck", "resblocks"])
def test_generator_without_xla_kernels_computes_the_same_and_traces_no_must_compile(position):
    gen = ResnetGenerator(ngf=4, n_blocks=2, dropout_position=position)
    x = tf.constant(np.random.default_rng(0).random((2, 16, 16, 1), np.float32))
    rows = tf.constant([[3, 0], [4, 1]], tf.int32)
    fast = gen(x, seed=rows).numpy()
    gen.xla_kernels = False
    fn = tf.function(lambda t, r: gen(t, seed=r)).get_concrete_function(
        tf.TensorSpec([None, None, None, 1]), tf.TensorSpec([None, 2], tf.int32))
    np.testing.assert_allclose(fn(x, rows).numpy(), fast, atol=1e-5)
    graph = fn.graph.as_graph_def()
    functions = list(graph.library.function)
    marked = [f.signature.name for f in functions if "_XlaMustCompile" in f.attr]
    marked += [n.name for n in graph.node if "_XlaMustCompile" in n.attr]
    marked += [n.name for f in functions for n in f.node_def if "_XlaMustCompile" in n.attr]
    assert marked == []
    gen.xla_kernels = True  # and the switch is what removes them
    fn = tf.function(lambda t, r: gen(t, seed=r)).get_concrete_function(
        tf.TensorSpec([None, None, None, 1]), tf.TensorSpec([None, 2], tf.int32))
    graph = fn.graph.as_graph_def()
    assert any("_XlaMustCompile" in f.attr for f in graph.library.function) or any(
        "_XlaMustCompile" in n.attr for f in graph.library.function for n in f.node_def)
