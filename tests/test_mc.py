"""Monte Carlo engine: eq. 4 exactly, cached prefix == naive full passes, chunking, seeds, memory budget."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from microsr_tf.errors import ConfigError, InputError
from microsr_tf.inference.mc import (AutoSamples, MonteCarloPredictor, _Moments, convergence_figures,
                                     naive_predict, seed_rows)
from microsr_tf.models.generator import ResnetGenerator
from microsr_tf.models.dropout import image_seeds


def tiny_generator(position: str = "bottleneck", seed: int = 0) -> ResnetGenerator:
    tf.keras.utils.set_random_seed(seed)
    return ResnetGenerator(ngf=4, n_blocks=2, upsample="transpose", dropout_rate=0.5, dropout_position=position)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((2, 32, 32, 1)).astype(np.float32)


def naive_samples(gen, x, samples, seed):
    """``[T, N, H, W, 1]``: every sample as one full generator pass with the engine's seed rows."""
    seeds = image_seeds(seed, len(x))  # the documented per-image convention for one base seed
    return np.stack([gen(x, seed=tf.constant(seed_rows(seeds, t))).numpy() for t in range(samples)])


@pytest.mark.parametrize("position", ["bottleneck", "resblocks"])
def test_cached_prefix_equals_naive_full_passes_and_eq4(images, position):
    gen = tiny_generator(position)
    result = MonteCarloPredictor(gen, samples=10, seed=42).predict(images)
    naive = naive_predict(gen, images, samples=10, seed=42)
    stack = naive_samples(gen, images, 10, 42).astype(np.float64)
    assert result.mean.shape == result.var.shape == images.shape
    np.testing.assert_allclose(result.mean, naive.mean, atol=1e-5)
    np.testing.assert_allclose(result.var, naive.var, atol=1e-6)
    # eq. 4: p = 1/T sum G_d(x), c = 1/T sum (G_d(x) - p)^2 (population variance)
    np.testing.assert_allclose(result.mean, stack.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(result.var, stack.var(axis=0, ddof=0), atol=1e-6)
    np.testing.assert_allclose(result.std, np.sqrt(stack.var(axis=0)), atol=1e-4)
    assert result.var.max() > 1e-5  # dropout really varies the samples


def test_result_does_not_depend_on_chunking_or_batching(images):
    gen = tiny_generator()
    base = MonteCarloPredictor(gen, samples=9, seed=3).predict(images)
    for chunk in (1, 4):
        other = MonteCarloPredictor(gen, samples=9, seed=3, chunk_size=chunk).predict(images)
        np.testing.assert_allclose(other.mean, base.mean, atol=1e-6)
        np.testing.assert_allclose(other.var, base.var, atol=1e-7)
    alone = MonteCarloPredictor(gen, samples=9, seed=int(image_seeds(3, 2)[1])).predict(images[1:])
    np.testing.assert_allclose(alone.mean[0], base.mean[1], atol=1e-6)
    np.testing.assert_allclose(alone.var[0], base.var[1], atol=1e-7)


def test_memory_budget_sizes_chunks_and_rejects_what_cannot_fit(images):
    gen = tiny_generator()
    predictor = MonteCarloPredictor(gen, samples=8, seed=1)
    per_sample = predictor.bytes_per_sample(32, 32)
    # at least the output and the features of one pass; grows with the image area
    assert per_sample > 32 * 32 * 4 + 8 * 8 * 16 * 4
    assert 3 * per_sample < predictor.bytes_per_sample(64, 64) <= 4 * per_sample
    three_rows = MonteCarloPredictor(gen, samples=8, seed=1, memory_budget_mb=3.5 * per_sample / 2**20)
    np.testing.assert_allclose(three_rows.predict(images).mean, predictor.predict(images).mean, atol=1e-6)
    assert three_rows.fits(32, 32) and not three_rows.fits(128, 128)
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        MonteCarloPredictor(gen, samples=8, memory_budget_mb=0.5 * per_sample / 2**20).predict(images)


def test_seeds_reproduce_and_none_draws_a_recorded_seed(images):
    gen = tiny_generator()
    a = MonteCarloPredictor(gen, samples=4).predict(images)
    b = MonteCarloPredictor(gen, samples=4).predict(images)
    assert a.seed != b.seed and not np.allclose(a.var, b.var)
    again = MonteCarloPredictor(gen, samples=4, seed=a.seed).predict(images)
    np.testing.assert_array_equal(again.mean, a.mean)
    per_image = MonteCarloPredictor(gen, samples=4).predict(images, seed=[a.seed, 99])
    np.testing.assert_array_equal(per_image.mean[0], a.mean[0])
    assert per_image.seed == (a.seed, 99) and not np.allclose(per_image.var[1], a.var[1])


def test_percentiles_match_numpy_over_the_samples(images):
    gen = tiny_generator()
    qs = (5, 50, 95)
    result = MonteCarloPredictor(gen, samples=12, seed=8, chunk_size=5, percentiles=qs).predict(images)
    stack = naive_samples(gen, images, 12, 8)
    assert set(result.percentiles) == {5.0, 50.0, 95.0}
    for q in qs:
        np.testing.assert_allclose(result.percentiles[q], np.percentile(stack, q, axis=0), atol=1e-5)
    assert MonteCarloPredictor(gen, samples=3, seed=8).predict(images).percentiles is None


def test_convergence_compares_half_and_all_samples(images):
    gen = tiny_generator()
    result = MonteCarloPredictor(gen, samples=10, seed=5, chunk_size=3).predict(images)
    stack = naive_samples(gen, images, 10, 5).astype(np.float64)
    expected = convergence_figures(stack[:5].mean(0), stack[:5].var(0), stack.mean(0), stack.var(0))
    assert result.convergence.keys() == expected.keys()
    for key, value in expected.items():
        assert result.convergence[key] == pytest.approx(value, rel=1e-3, abs=1e-7)
    many = MonteCarloPredictor(gen, samples=64, seed=5).predict(images)
    assert many.convergence["mean_rel_change"] < result.convergence["mean_rel_change"]


def test_streaming_moments_are_numerically_stable():
    rng = np.random.default_rng(0)
    data = 1e4 + 1e-2 * rng.standard_normal((100, 50))  # large offset, tiny spread
    moments = _Moments()
    for a, b in ((0, 7), (7, 50), (50, 51), (51, 100)):
        chunk = data[a:b]
        moments.merge(b - a, chunk.mean(0), ((chunk - chunk.mean(0)) ** 2).sum(0))
    np.testing.assert_allclose(moments.mean, data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.variance(), data.var(0), rtol=1e-8)


@pytest.mark.parametrize("kwargs", [{"samples": 1}, {"samples": 0}, {"chunk_size": 0},
                                    {"memory_budget_mb": 0}, {"percentiles": (101,)}, {"seed": -1},
                                    {"precision": "float16"}])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        MonteCarloPredictor(tiny_generator(), **{"samples": 4, **kwargs})


def test_bad_inputs_are_input_errors(images):
    predictor = MonteCarloPredictor(tiny_generator(), samples=2, seed=0)
    with pytest.raises(InputError, match="multiples of 4"):
        predictor.predict(np.zeros((1, 30, 32, 1), np.float32))
    with pytest.raises(InputError, match=r"\[N, H, W, 1\]"):
        predictor.predict(np.zeros((32, 32), np.float32))
    with pytest.raises(ConfigError, match="per-image"):
        predictor.predict(images, seed=[1, 2, 3])


def test_xla_engine_matches_the_plain_ops_posterior(images):
    gen = tiny_generator("resblocks")
    gen(images[:1])
    plain = ResnetGenerator.from_config(gen.get_config())
    plain.xla_kernels = False
    plain(images[:1])
    plain.set_weights(gen.get_weights())
    fast = MonteCarloPredictor(gen, samples=6, seed=11).predict(images)
    reference = naive_predict(plain, images, samples=6, seed=11)
    np.testing.assert_allclose(fast.mean, reference.mean, atol=1e-5)
    np.testing.assert_allclose(fast.var, reference.var, atol=1e-6)
    assert reference.var.max() > 1e-5


@pytest.mark.parametrize("position", ["bottleneck", "resblocks"])
def test_bfloat16_posterior_is_close_to_float32_and_reproducible(images, position):
    gen = tiny_generator(position)
    exact = MonteCarloPredictor(gen, samples=8, seed=3).predict(images)
    predictor = MonteCarloPredictor(gen, samples=8, seed=3, precision="bfloat16")
    fast = predictor.predict(images)
    assert gen.encoder[1].compute_dtype == "float32"  # the trained generator is left as it was
    assert fast.mean.dtype == fast.var.dtype == np.float32
    # Same seed rows, hence the same dropout masks: only bfloat16 rounding separates the posteriors.
    np.testing.assert_allclose(fast.mean, exact.mean, atol=1e-2)
    np.testing.assert_allclose(fast.var, exact.var, atol=0.1 * exact.var.max())
    assert np.abs(fast.mean - exact.mean).max() > 0  # the bfloat16 path really ran
    again = MonteCarloPredictor(gen, samples=8, seed=3, precision="bfloat16").predict(images)
    np.testing.assert_array_equal(again.mean, fast.mean)
    np.testing.assert_array_equal(again.var, fast.var)
    other = predictor.predict(images, seed=4)
    assert not np.array_equal(other.mean, fast.mean)


# ----- samples="auto" ---------------------------------------------------------------------------------

class Deterministic:
    """A contract-following model whose samples ignore their seed rows: every sample is ``0.5 * x``."""

    def deterministic_prefix(self, x):
        return (0.5 * tf.convert_to_tensor(x),)

    def stochastic_suffix(self, features, seed):
        return features[0]

    def __call__(self, x, seed=None):
        return self.stochastic_suffix(self.deterministic_prefix(x), seed)


def first_converged(stack: np.ndarray, auto: AutoSamples) -> int:
    """The ``T`` the documented rule picks, from ``[T, ...]`` samples with numpy: the first checkpoint whose
    figures between ``T // 2`` and ``T`` meet both tolerances, else the last."""
    for t in auto.checkpoints:
        half, full = stack[:t // 2], stack[:t]
        figures = convergence_figures(half.mean(0), half.var(0), full.mean(0), full.var(0))
        if figures["mean_rel_change"] <= auto.mean_tolerance and figures["var_rel_change"] <= auto.var_tolerance:
            return t
    return auto.max_samples


def test_auto_checkpoints_step_by_sqrt2_and_bad_settings_are_config_errors():
    assert AutoSamples().checkpoints == (12, 17, 25, 35, 50, 71, 100)
    assert AutoSamples(max_samples=20).checkpoints == (10, 14, 20)
    for bad in ({"max_samples": 1}, {"min_samples": 200}, {"mean_tolerance": -0.1}, {"var_tolerance": "x"}):
        with pytest.raises(ConfigError):
            AutoSamples(**bad)
    with pytest.raises(ConfigError, match="'auto'"):
        MonteCarloPredictor(tiny_generator(), samples="many")


def test_auto_stops_a_deterministic_model_at_the_first_check(images):
    result = MonteCarloPredictor(Deterministic(), samples="auto", seed=0).predict(images)
    assert result.image_samples == (12, 12) and result.samples == 12
    np.testing.assert_allclose(result.mean, 0.5 * images, atol=1e-7)
    assert result.var.max() < 1e-12  # float rounding only


@pytest.mark.parametrize("decoder_norm", ["instance", "none"])
def test_auto_stops_where_the_rule_says_and_equals_the_fixed_t_posterior_there(images, decoder_norm):
    tf.keras.utils.set_random_seed(0)
    gen = ResnetGenerator(ngf=4, n_blocks=2, dropout_position="bottleneck", decoder_norm=decoder_norm)
    auto = AutoSamples()
    result = MonteCarloPredictor(gen, samples=auto, seed=7).predict(images)
    stack = naive_samples(gen, images, 100, 7).astype(np.float64)
    expected = tuple(first_converged(stack[:, b], auto) for b in range(len(images)))
    assert result.image_samples == expected
    assert min(expected) > auto.checkpoints[0]  # dropout noise: more than the first check's samples
    for b, t in enumerate(expected):
        fixed = MonteCarloPredictor(gen, samples=t, seed=int(image_seeds(7, 2)[b])).predict(images[b:b + 1])
        np.testing.assert_allclose(result.mean[b], fixed.mean[0], atol=1e-6)
        np.testing.assert_allclose(result.var[b], fixed.var[0], atol=1e-7)
        np.testing.assert_allclose(result.mean[b], stack[:t, b].mean(0), atol=1e-5)


def test_auto_in_the_cli_reports_the_t_of_every_slice(tmp_path):
    import nibabel as nib
    from click.testing import CliRunner

    from microsr_tf.cli.main import cli
    from microsr_tf.inference.predict import predict_volume, slice_seed
    from microsr_tf.models.artifact import save_generator
    from microsr_tf.preprocessing import IntensityStats

    gen = tiny_generator()
    gen(np.zeros((1, 32, 32, 1), np.float32))
    meta = {"format": 1, "hr_spacing": [0.1, 0.1], "lr_spacing": [0.4, 0.4], "factors": [4.0, 4.0],
            "hr_stats": IntensityStats(2000.0, 500.0, -3.0, 3.0).to_dict(), "model": {"ngf": 4, "n_blocks": 2},
            "patch_size": 32, "axis": -1}
    save_generator(gen, tmp_path / "generator.keras", meta)
    rng = np.random.default_rng(0)
    data = 100 + 400 * rng.random((8, 8, 3))
    nib.save(nib.Nifti1Image(data.astype(np.int16), np.diag([0.4, 0.4, 0.8, 1.0])), tmp_path / "ear.nii.gz")
    run = CliRunner().invoke(cli, ["predict", str(tmp_path / "ear.nii.gz"), "--model", str(tmp_path / "generator.keras"),
                                   "--out-dir", str(tmp_path / "out"), "--samples", "auto", "--seed", "5"])
    assert run.exit_code == 0, run.output
    assert "T=auto (" in run.output
    result = predict_volume(tmp_path / "ear.nii.gz", gen, meta, tmp_path / "again", samples="auto", seed=5)
    assert len(result.slice_samples) == 3 and set(result.slice_samples) <= set(AutoSamples().checkpoints)
    assert result.auto and result.samples == max(result.slice_samples)
    # slice k equals a fixed-T prediction of the volume at slice k's T
    t = result.slice_samples[1]
    fixed = predict_volume(tmp_path / "ear.nii.gz", gen, meta, tmp_path / "fixed", samples=t, seed=5)
    a, b = (nib.load(r.outputs["mean"]).get_fdata()[:, :, 1] for r in (result, fixed))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
    assert f"T={t}" in fixed.summary()
    assert slice_seed(5, 1) != slice_seed(5, 2)
    bad = CliRunner().invoke(cli, ["predict", str(tmp_path / "ear.nii.gz"), "--model", str(tmp_path / "generator.keras"),
                                   "--out-dir", str(tmp_path / "bad"), "--samples", "lots"])
    assert bad.exit_code != 0 and "--samples" in bad.output and "Traceback" not in bad.output


def test_a_generator_without_dropout_gets_one_pass_and_an_exactly_zero_variance(images):
    gen = tiny_generator("none")
    result = MonteCarloPredictor(gen, samples=100, seed=1, percentiles=(5, 95)).predict(images)
    np.testing.assert_array_equal(result.var, 0.0)  # exactly: T identical passes would round to ~1e-14
    np.testing.assert_allclose(result.mean, gen(images).numpy(), atol=1e-5)  # batch of 1 vs 2: float rounding
    np.testing.assert_array_equal(result.percentiles[5.0], result.mean)
    assert result.samples == 100 and result.convergence["mean_max_change"] == 0.0


class _NoHiddenMemory(ResnetGenerator):
    """The same generator with the fused head's temporaries left out of the memory estimate."""

    hidden_bytes_per_pixel = 0


@pytest.mark.parametrize("decoder_norm", ["instance", "none"])
def test_memory_estimate_counts_the_fused_heads_temporaries(decoder_norm):
    """The 7x7 head's fused kernel holds its 49 tap planes twice (plain and padded) and 7 row sums, all
    float32, inside one XLA op that traced graphs do not show: the engine adds them per output pixel."""
    kwargs = dict(ngf=4, n_blocks=1, decoder_norm=decoder_norm)
    counted, left_out = ResnetGenerator(**kwargs), _NoHiddenMemory(**kwargs)
    for gen in (counted, left_out):
        gen(np.zeros((1, 32, 32, 1), np.float32))
    per_pixel = 4 * (2 * 7 * 7 + 7)
    assert counted.hidden_bytes_per_pixel == per_pixel
    h, w = 64, 96
    a = MonteCarloPredictor(counted, samples=4).bytes_per_sample(h, w)
    b = MonteCarloPredictor(left_out, samples=4).bytes_per_sample(h, w)
    rows = h if decoder_norm == "instance" else 4 * min(h // 4, sum(counted.decoder_reach) + 1)
    assert a - b == rows * w * per_pixel


def test_a_huge_sample_count_is_planned_as_it_runs_not_all_at_once():
    import itertools
    import tracemalloc

    pred = MonteCarloPredictor(tiny_generator(), samples=10**12, seed=0)
    tracemalloc.start()
    first = list(itertools.islice(pred._bounds(8), 3))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert first == [(0, 8), (8, 16), (16, 24)] and peak < 2**20
