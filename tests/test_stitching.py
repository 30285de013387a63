"""Whole-slice stitching: exactness on known tile outputs, the paper's recipe, and no tile grid."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import median_filter

from microsr_tf.errors import ConfigError, InputError
from microsr_tf.inference.mc import MonteCarloPredictor, seed_rows
from microsr_tf.inference.stitching import gaussian_window, predict_slice, tile_layout, tile_redundancy, tile_seed
from microsr_tf.models.generator import ResnetGenerator
from microsr_tf.patches import patches_at


class NoisyScale:
    """A contract-following model with known outputs: ``scale * x + sigma * N(0, 1)`` per seed row.

    Its posterior is known in closed form (mean ``scale * x``, variance ``sigma^2``), so the stitcher
    can be checked exactly; the noise is drawn per tile in tile coordinates, like dropout masks.
    """

    def __init__(self, scale: float = 1.0, sigma: float = 0.0):
        self.scale, self.sigma = scale, sigma

    def deterministic_prefix(self, x):
        return (self.scale * tf.convert_to_tensor(x),)

    def stochastic_suffix(self, features, seed):
        (y,) = features
        if self.sigma == 0.0:
            return y
        noise = tf.map_fn(lambda s: tf.random.stateless_normal(tf.shape(y)[1:], s), seed,
                          fn_output_signature=tf.float32)
        return y + self.sigma * noise

    def __call__(self, x, seed=None):
        return self.stochastic_suffix(self.deterministic_prefix(x), seed)


def smooth_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (0.5 + 0.3 * np.sin(yy / 9.0) * np.cos(xx / 13.0)).astype(np.float32)


def overlap_ratio(map2d: np.ndarray, shape2, tile: int, overlap: float) -> float:
    """Mean of the row/column profiles where tiles overlap over the mean where one tile covers."""
    eff, _, _, origins = tile_layout(shape2, "blend", tile, overlap)
    ratios = []
    for axis in (0, 1):
        cover = np.zeros(shape2[axis])
        for start in sorted({o[axis] for o in origins}):
            cover[start:start + eff] += 1
        profile = map2d.mean(axis=1 - axis)
        ratios.append(profile[cover > 1].mean() / profile[cover == 1].mean())
    return float(np.mean(ratios))


def naive_sample_average(model, image, tile, overlap, samples, seed):
    """The wrong way: stitch each dropout sample by plain averaging, then take the variance over samples."""
    eff, _, padded_shape, origins = tile_layout(image.shape, "blend", tile, overlap)
    tiles = patches_at(image, np.asarray(origins), eff)[..., None]
    count = np.zeros(padded_shape)
    for i, j in origins:
        count[i:i + eff, j:j + eff] += 1
    stack = []
    for t in range(samples):
        rows = seed_rows([tile_seed(seed, i, j) for i, j in origins], t)
        out = np.asarray(model(tiles, rows))[..., 0]
        total = np.zeros(padded_shape)
        for (i, j), y in zip(origins, out):
            total[i:i + eff, j:j + eff] += y
        stack.append(total / count)
    return np.var(np.stack(stack), axis=0)


def test_blend_reproduces_a_smooth_image_exactly():
    image = smooth_image(70, 93)  # not multiples of the tile or of 4
    predictor = MonteCarloPredictor(NoisyScale(), samples=2, seed=0)
    result = predict_slice(predictor, image, mode="blend", tile=32, overlap=0.25, batch_size=5)
    assert result.mean.shape == image.shape and result.mean.dtype == np.float32
    np.testing.assert_allclose(result.mean, image, atol=1e-6)
    np.testing.assert_allclose(result.var, 0.0, atol=1e-9)


class TileMean:
    """A contract-following model whose output is constant per tile: the mean of that input tile."""

    def deterministic_prefix(self, x):
        x = tf.convert_to_tensor(x)
        return (tf.broadcast_to(tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True), tf.shape(x)),)

    def stochastic_suffix(self, features, seed):
        return features[0]


def test_blend_of_known_tile_outputs_is_their_gaussian_weighted_average():
    image = smooth_image(72, 56)
    result = predict_slice(MonteCarloPredictor(TileMean(), samples=2, seed=0), image, tile=32, overlap=0.5)
    eff, _, _, origins = tile_layout(image.shape, "blend", 32, 0.5)
    w = gaussian_window(eff)
    num, den = np.zeros(image.shape), np.zeros(image.shape)
    for i, j in origins:
        num[i:i + eff, j:j + eff] += w * image[i:i + eff, j:j + eff].mean()
        den[i:i + eff, j:j + eff] += w
    np.testing.assert_allclose(result.mean, num / den, atol=1e-6)
    assert np.ptp(result.mean) > 0.05  # tiles really differ, so the weights matter
    # deterministic tiles that disagree: their disagreement is a cropping effect, not model uncertainty
    np.testing.assert_allclose(result.var, 0.0, atol=1e-12)
    assert np.allclose(w, w.T) and np.allclose(w, w[::-1]) and w.argmax() in (15 * 32 + 15, 15 * 32 + 16)
    assert w[0, 0] < 1e-6 < w[0, 16]


def test_blend_variance_is_the_tile_variance_everywhere_but_naive_averaging_shows_the_grid():
    sigma, samples, tile, overlap = 0.1, 48, 32, 0.25
    image = np.full((120, 120), 0.5, np.float32)
    model = NoisyScale(sigma=sigma)
    result = predict_slice(MonteCarloPredictor(model, samples=samples, seed=7), image, tile=tile,
                           overlap=overlap, batch_size=8)
    np.testing.assert_allclose(result.mean.mean(), 0.5, atol=2e-3)
    assert result.var.mean() == pytest.approx(sigma**2, rel=0.05)
    good = overlap_ratio(result.var, image.shape, tile, overlap)
    naive = overlap_ratio(naive_sample_average(model, image, tile, overlap, samples, seed=7),
                          image.shape, tile, overlap)
    assert abs(good - 1.0) < 0.05, good
    assert naive < 0.8, naive  # independent tiles averaged: variance shrinks where they overlap


def test_stationary_input_through_a_generator_leaves_no_tile_pattern():
    """Overlap rows/cols look like the rest (as in an untiled pass); naive sample averaging does not."""
    tf.keras.utils.set_random_seed(3)
    gen = ResnetGenerator(ngf=4, n_blocks=1, upsample="transpose", dropout_rate=0.5,
                          dropout_position="bottleneck")
    rng = np.random.default_rng(0)
    image = np.clip(0.5 + 0.1 * rng.standard_normal((256, 256)), 0, 1).astype(np.float32)
    tile, overlap, samples, seed = 64, 0.25, 16, 11
    predictor = MonteCarloPredictor(gen, samples=samples, seed=seed)
    blend = predict_slice(predictor, image, tile=tile, overlap=overlap, batch_size=16)
    whole = predict_slice(predictor, image, mode="whole")  # no tiles: the noise floor of the statistic
    naive_var = naive_sample_average(gen, image, tile, overlap, samples, seed)
    for untiled, tiled in ((whole.mean, blend.mean), (whole.var, blend.var)):
        assert abs(overlap_ratio(untiled, image.shape, tile, overlap) - 1.0) < 0.04
        assert abs(overlap_ratio(tiled, image.shape, tile, overlap) - 1.0) < 0.04
    assert overlap_ratio(naive_var, image.shape, tile, overlap) < 0.7
    assert blend.var.mean() == pytest.approx(whole.var.mean(), rel=0.1)


def test_paper_mode_histogram_matches_each_tile_then_median_filters():
    image = smooth_image(100, 84)
    image += np.random.default_rng(1).uniform(0, 1e-3, image.shape).astype(np.float32)  # distinct values
    predictor = MonteCarloPredictor(NoisyScale(scale=0.5), samples=2, seed=0)
    paper = predict_slice(predictor, image, mode="paper", tile=32)
    blend = predict_slice(predictor, image, mode="blend", tile=32)
    # a monotone model output matched to its input tile's histogram is the input tile again
    np.testing.assert_allclose(paper.mean, median_filter(image, size=3), atol=1e-5)
    np.testing.assert_allclose(blend.mean, 0.5 * image, atol=1e-6)
    five = predict_slice(predictor, image, mode="paper", tile=32, median_size=5)
    np.testing.assert_allclose(five.mean, median_filter(image, size=5), atol=1e-5)


def test_paper_mode_uses_half_tile_stride():
    eff, stride, padded, origins = tile_layout((512, 384), "paper", 256, overlap=0.1)
    assert (eff, stride, padded) == (256, 128, (512, 384))
    assert sorted({i for i, _ in origins}) == [0, 128, 256]
    assert sorted({j for _, j in origins}) == [0, 128]


def test_whole_mode_is_one_pass_and_refuses_when_over_budget():
    image = smooth_image(50, 70)
    result = predict_slice(MonteCarloPredictor(NoisyScale(), samples=2, seed=0), image, mode="whole")
    assert result.mean.shape == (50, 70)
    np.testing.assert_allclose(result.mean, image, atol=1e-7)
    tiny = MonteCarloPredictor(NoisyScale(), samples=2, seed=0, memory_budget_mb=0.01)
    with pytest.raises(ConfigError, match="blend"):
        predict_slice(tiny, smooth_image(200, 200), mode="whole")


def test_slice_smaller_than_the_tile_costs_one_small_tile():
    image = smooth_image(20, 30)
    eff, _, padded, origins = tile_layout(image.shape, "blend", 256, 0.25)
    assert (eff, padded, len(origins)) == (32, (32, 32), 1)
    result = predict_slice(MonteCarloPredictor(NoisyScale(), samples=2, seed=0), image)
    np.testing.assert_allclose(result.mean, image, atol=1e-6)


def test_tile_batch_size_and_seed_make_results_reproducible():
    image = smooth_image(64, 64)
    model = NoisyScale(sigma=0.05)
    one = predict_slice(MonteCarloPredictor(model, samples=4, seed=5), image, tile=32, batch_size=1)
    many = predict_slice(MonteCarloPredictor(model, samples=4, seed=5), image, tile=32, batch_size=9)
    np.testing.assert_allclose(one.mean, many.mean, atol=1e-7)
    np.testing.assert_allclose(one.var, many.var, atol=1e-7)
    drawn = predict_slice(MonteCarloPredictor(model, samples=4), image, tile=32)
    again = predict_slice(MonteCarloPredictor(model, samples=4, seed=drawn.seed), image, tile=32)
    np.testing.assert_allclose(drawn.mean, again.mean, atol=1e-7)
    assert set(drawn.convergence) == {"mean_rel_change", "mean_max_change", "var_rel_change", "var_max_rel_change"}


def test_stitched_percentiles_bracket_the_mean():
    sigma = 0.1
    image = np.full((48, 48), 0.5, np.float32)
    predictor = MonteCarloPredictor(NoisyScale(sigma=sigma), samples=200, seed=2, percentiles=(2.5, 50, 97.5))
    result = predict_slice(predictor, image, tile=32)
    assert set(result.percentiles) == {2.5, 50.0, 97.5}
    assert result.percentiles[50.0].mean() == pytest.approx(0.5, abs=5e-3)
    assert result.percentiles[97.5].mean() - 0.5 == pytest.approx(1.96 * sigma, rel=0.1)
    assert result.percentiles[2.5].shape == image.shape


def test_overlap_work_is_counted_and_small_by_default():
    assert tile_redundancy((1024, 1024), "blend", 256, 0.25) == pytest.approx(25 * 256**2 / 1024**2)
    assert tile_redundancy((1024, 1024), "paper", 256) == pytest.approx(49 * 256**2 / 1024**2)
    assert tile_redundancy((1024, 1024)) < tile_redundancy((1024, 1024), "blend", 256, 0.5)


@pytest.mark.parametrize("kwargs, error", [
    ({"mode": "grid"}, ConfigError),
    ({"tile": 30}, ConfigError),
    ({"overlap": 1.0}, ConfigError),
    ({"batch_size": 0}, ConfigError),
    ({"mode": "paper", "median_size": 0}, ConfigError),
])
def test_bad_options_are_one_line_config_errors(kwargs, error):
    predictor = MonteCarloPredictor(NoisyScale(), samples=2, seed=0)
    with pytest.raises(error):
        predict_slice(predictor, smooth_image(40, 40), **kwargs)


def test_bad_slices_are_input_errors():
    predictor = MonteCarloPredictor(NoisyScale(), samples=2, seed=0)
    with pytest.raises(InputError, match="2-D"):
        predict_slice(predictor, np.zeros((4, 8, 8), np.float32))
    bad = smooth_image(40, 40)
    bad[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        predict_slice(predictor, bad)
