"""Monte Carlo dropout posterior of the generator (paper eq. 4), computed without redundant work.

Every sample shares the generator's deterministic prefix (everything before the first always-on
dropout), so the prefix runs once per input and only the stochastic suffix runs ``T`` times, on the
prefix features repeated along the batch axis in chunks sized to a memory budget. Mean and variance
are accumulated chunk by chunk with Chan's parallel merge of moments, so memory does not grow with
``T``. Sample ``t`` of an image with seed ``s`` uses the dropout seed row ``[s, t]``, which makes the
result independent of chunking and batching and equal to :func:`naive_predict` (``T`` full passes
with the same rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from microsr_tf.errors import ConfigError, InputError
from microsr_tf.models.generator import with_precision
from microsr_tf.models.layers import image_seeds

_MAX_SEED = 2**31 - 1  # seed rows are int32
_LIVE_FACTOR = 3  # live activations of a conv stack ~ input + output + one skip of the largest tensor


@dataclass
class MCResult:
    """Posterior mean ``p`` and variance ``c`` of eq. 4 over ``samples`` dropout passes.

    ``mean``/``var`` are ``[N, H, W, 1]`` from :meth:`MonteCarloPredictor.predict` and ``[H, W]`` for a
    stitched slice. ``percentiles`` maps q (0-100) to the per-pixel q-th percentile of the samples
    (only when asked for). ``convergence`` compares the moments after ``samples // 2`` and ``samples``
    passes (see :func:`convergence_figures`).
    """

    mean: np.ndarray
    var: np.ndarray
    samples: int
    seed: int | tuple[int, ...]
    percentiles: dict[float, np.ndarray] | None = None
    convergence: dict[str, float] = field(default_factory=dict)

    @property
    def std(self) -> np.ndarray:
        """Per-pixel posterior standard deviation, ``sqrt(var)``."""
        return np.sqrt(self.var)


def seed_rows(seeds: Sequence[int] | np.ndarray, t: int) -> np.ndarray:
    """``[N, 2]`` int32 dropout seed rows ``[seeds[n], t]``: sample ``t`` of images with these seeds."""
    seeds = np.asarray(seeds, dtype=np.int32).reshape(-1)
    return np.stack([seeds, np.full_like(seeds, t)], axis=1)


def convergence_figures(mean_half: np.ndarray, var_half: np.ndarray, mean: np.ndarray,
                        var: np.ndarray) -> dict[str, float]:
    """How much the posterior still moved between ``T/2`` and ``T`` samples; small values mean ``T`` suffices.

    ``mean_rel_change`` / ``var_rel_change``: mean absolute change over the mean magnitude;
    ``mean_max_change``: largest absolute change of the mean (intensity units, images are in [0, 1]);
    ``var_max_rel_change``: largest absolute change of the variance over the largest variance.
    The Monte Carlo error shrinks like ``1/sqrt(T)``, so doubling ``T`` roughly divides these by 1.4.
    """
    tiny = np.finfo(np.float64).tiny
    dm = np.abs(np.asarray(mean, np.float64) - mean_half)
    dv = np.abs(np.asarray(var, np.float64) - var_half)
    return {
        "mean_rel_change": float(dm.mean() / max(float(np.abs(mean).mean()), tiny)),
        "mean_max_change": float(dm.max()),
        "var_rel_change": float(dv.mean() / max(float(np.mean(var)), tiny)),
        "var_max_rel_change": float(dv.max() / max(float(np.max(var)), tiny)),
    }


class _Moments:
    """Streaming per-pixel count, mean and sum of squared deviations (Chan et al. parallel merge)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | float = 0.0
        self.m2: np.ndarray | float = 0.0

    def merge(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Fold in a chunk of ``count`` samples with its own mean and squared-deviation sum."""
        mean = np.asarray(mean, np.float64)
        m2 = np.asarray(m2, np.float64)
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total

    def variance(self) -> np.ndarray:
        """Population variance (``1/T``, eq. 4)."""
        return np.asarray(self.m2) / self.count


def _check_images(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 1 or x.shape[0] < 1:
        raise InputError(None, f"expected images of shape [N, H, W, 1], got {x.shape}")
    if x.shape[1] % 4 or x.shape[2] % 4:
        raise InputError(None, f"image height and width must be multiples of 4 for the generator, got "
                               f"{x.shape[1]}x{x.shape[2]} (pad the slice or use inference.stitching)")
    return x


def resolve_seed(seed: int | None) -> int:
    """A valid int32 Monte Carlo seed: ``seed`` checked, or a random one when it is ``None``."""
    if seed is None:
        return int(np.random.default_rng().integers(0, _MAX_SEED))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= _MAX_SEED:
        raise ConfigError(f"Monte Carlo seed must be an integer in [0, {_MAX_SEED}], got {seed!r}")
    return int(seed)


def _resolve_seeds(seed, n: int) -> tuple[int | tuple[int, ...], np.ndarray]:
    """``(seed as recorded, [n] int32 per-image seeds)`` from an int, ``None`` or one int per image.

    One int is a base seed: image ``b`` of the batch gets :func:`~microsr_tf.models.layers.image_seeds`
    ``(seed, n)[b]`` (image 0 the seed itself), the convention the served signatures follow too.
    """
    if seed is None or isinstance(seed, (int, np.integer)):
        seed = resolve_seed(seed)
        return seed, image_seeds(seed, n)
    seeds = tuple(resolve_seed(s) for s in seed)
    if len(seeds) != n:
        raise ConfigError(f"got {len(seeds)} per-image Monte Carlo seeds for {n} images")
    return seeds, np.asarray(seeds, np.int32)


def _per_example_bytes(graph: tf.Graph) -> int:
    """Bytes of the largest per-example tensor in a graph traced with a ``None`` batch dimension."""
    largest = 0
    for op in graph.get_operations():
        for t in op.outputs:
            dims = t.shape.as_list() if t.shape.rank else None
            if not dims or dims[0] is not None or None in dims[1:]:
                continue
            if not (t.dtype.is_floating or t.dtype.is_integer or t.dtype == tf.bool):
                continue
            largest = max(largest, math.prod(dims[1:]) * t.dtype.size)
    return largest


def _spec_bytes(specs) -> int:
    return sum(math.prod(s.shape.as_list()[1:]) * s.dtype.size for s in tf.nest.flatten(specs))


@dataclass
class _Plan:
    """Per image size: memory of one image's one pass, and the traced prefix and chunk functions."""

    bytes_per_sample: int
    prefix: Callable
    chunk: Callable


class MonteCarloPredictor:
    """Posterior mean and variance of a generator's outputs over ``samples`` MC dropout passes.

    ``generator`` follows the ``ResnetGenerator`` contract (``deterministic_prefix`` /
    ``stochastic_suffix`` with per-example ``[B, 2]`` seed rows). ``seed=None`` draws a fresh seed per
    :meth:`predict` call (recorded in the result) that all images of the call share. ``chunk_size`` fixes how many samples run per suffix
    call; ``None`` sizes chunks to ``memory_budget_mb``, estimated from the traced graphs. Percentiles
    need the raw samples, so asking for them keeps all ``samples`` outputs in host memory
    (``N * samples * H * W * 4`` bytes); without them memory does not grow with ``samples``.
    ``precision="bfloat16"`` runs the stochastic suffix's convolutions in bfloat16 (see
    :func:`~microsr_tf.models.generator.with_precision`); the prefix, which runs once per input, stays
    float32, and so do the outputs and the moments.
    """

    def __init__(self, generator, samples: int = 100, seed: int | None = None, chunk_size: int | None = None,
                 memory_budget_mb: float = 1024, percentiles: Sequence[float] = (),
                 jit_compile: bool = False, precision: str = "float32"):
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
            raise ConfigError(f"Monte Carlo samples must be an integer >= 2 (variance needs two), got {samples!r}")
        if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
            raise ConfigError(f"Monte Carlo chunk_size must be a positive integer or None, got {chunk_size!r}")
        if not memory_budget_mb > 0:
            raise ConfigError(f"memory_budget_mb must be positive, got {memory_budget_mb!r}")
        qs = tuple(float(q) for q in percentiles)
        if any(not 0.0 <= q <= 100.0 for q in qs):
            raise ConfigError(f"percentiles must lie in [0, 100], got {list(percentiles)}")
        if seed is not None:
            resolve_seed(seed)
        self.generator = generator
        self.precision = precision
        self._suffix_generator = with_precision(generator, precision)
        self._feature_dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
        self.samples = int(samples)
        self.seed = seed
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.memory_budget_mb = float(memory_budget_mb)
        self.percentiles = qs
        self._prefix = tf.function(generator.deterministic_prefix)
        self._chunk = tf.function(self._chunk_moments, jit_compile=jit_compile)
        self._plans: dict[tuple[int, int], _Plan] = {}

    def _chunk_moments(self, features, image_seeds, sample_ids):
        """Suffix on each image's features repeated once per sample id; per-image chunk mean, M2, samples."""
        k = tf.shape(sample_ids)[0]
        n = tf.shape(image_seeds)[0]
        tiled = tf.nest.map_structure(lambda f: tf.repeat(tf.cast(f, self._feature_dtype), k, axis=0), features)
        rows = tf.stack([tf.repeat(image_seeds, k), tf.tile(sample_ids, [n])], axis=1)
        y = self._suffix_generator.stochastic_suffix(tiled, rows)
        y = tf.reshape(y, tf.concat([[n, k], tf.shape(y)[1:]], axis=0))
        mean = tf.reduce_mean(y, axis=1)
        m2 = tf.reduce_sum(tf.square(y - mean[:, None]), axis=1)
        return mean, m2, y

    def bytes_per_sample(self, height: int, width: int) -> int:
        """Estimated memory of one image's one Monte Carlo pass at ``height x width``, from the traced graphs.

        Counts the repeated prefix features, the output and a few copies of the largest activation
        (prefix or suffix), which is what a chunk keeps alive at its peak.
        """
        return self._plan(height, width).bytes_per_sample

    def _plan(self, height: int, width: int) -> "_Plan":
        """Trace prefix and chunk once per image size (batch ``None``) and estimate their memory."""
        key = (int(height), int(width))
        if key not in self._plans:
            prefix = self._prefix.get_concrete_function(tf.TensorSpec([None, *key, 1], tf.float32))
            feature_specs = tf.nest.map_structure(
                lambda t: tf.TensorSpec(t.shape, t.dtype), prefix.structured_outputs)
            ids = tf.TensorSpec([None], tf.int32)
            chunk = self._chunk.get_concrete_function(feature_specs, ids, ids)
            largest = max(_per_example_bytes(prefix.graph), _per_example_bytes(chunk.graph))
            out_bytes = math.prod(key) * 4
            per_sample = _spec_bytes(feature_specs) + out_bytes + _LIVE_FACTOR * largest
            self._plans[key] = _Plan(per_sample, prefix, chunk)
        return self._plans[key]

    def fits(self, height: int, width: int) -> bool:
        """Whether one Monte Carlo pass of one ``height x width`` image fits ``memory_budget_mb``."""
        return self.bytes_per_sample(height, width) <= self.memory_budget_mb * 2**20

    def predict(self, x, seed: int | Sequence[int] | None = None) -> MCResult:
        """Eq. 4 for each image of ``x`` (``[N, H, W, 1]``, H and W multiples of 4, values in [0, 1]).

        ``seed`` overrides the predictor's seed for this call: one int for all images, or one per
        image (tiles of a slice get their own, so their Monte Carlo errors are independent); ``None``
        with no predictor seed draws a random one.
        """
        x = _check_images(x)
        seed, image_seeds = _resolve_seeds(self.seed if seed is None else seed, len(x))
        n, h, w, _ = x.shape
        plan = self._plan(h, w)
        per_sample = plan.bytes_per_sample
        rows_fit = int(self.memory_budget_mb * 2**20 // per_sample)
        if rows_fit < 1:
            raise ConfigError(
                f"one {h}x{w} Monte Carlo pass needs about {per_sample / 2**20:.0f} MB, over "
                f"memory_budget_mb={self.memory_budget_mb:g}; raise the budget or predict in tiles")
        half = self.samples // 2
        if self.chunk_size:
            chunk = self.chunk_size
            group = max(1, min(n, rows_fit // chunk))
        else:
            group = min(n, rows_fit)
            chunk = max(1, min(self.samples - half, rows_fit // group))
        bounds = [(a, min(a + chunk, stop)) for start, stop in ((0, half), (half, self.samples))
                  for a in range(start, stop, chunk)]
        means, variances, mean_halves, var_halves, kept = [], [], [], [], []
        for g0 in range(0, n, group):
            features = plan.prefix(tf.constant(x[g0:g0 + group]))
            group_seeds = tf.constant(image_seeds[g0:g0 + group])
            moments = _Moments()
            samples = [] if self.percentiles else None
            for a, b in bounds:
                c_mean, c_m2, y = plan.chunk(features, group_seeds, tf.range(a, b, dtype=tf.int32))
                moments.merge(b - a, c_mean.numpy(), c_m2.numpy())
                if samples is not None:
                    samples.append(y.numpy())
                if b == half:
                    mean_halves.append(moments.mean)
                    var_halves.append(moments.variance())
            means.append(moments.mean)
            variances.append(moments.variance())
            if samples is not None:
                kept.append(np.percentile(np.concatenate(samples, axis=1), self.percentiles, axis=1))
        return _result(means, variances, mean_halves, var_halves, kept, self.percentiles, self.samples, seed)


def _result(means, variances, mean_halves, var_halves, kept, qs, samples, seed) -> MCResult:
    mean = np.concatenate(means).astype(np.float32)
    var = np.concatenate(variances).astype(np.float32)
    percentiles = None
    if qs:
        stacked = np.concatenate(kept, axis=1).astype(np.float32)
        percentiles = {q: stacked[i] for i, q in enumerate(qs)}
    conv = convergence_figures(np.concatenate(mean_halves), np.concatenate(var_halves), mean, var)
    return MCResult(mean=mean, var=var, samples=samples, seed=seed, percentiles=percentiles, convergence=conv)


def naive_predict(generator, x, samples: int = 100, seed: int | Sequence[int] | None = None,
                  percentiles: Sequence[float] = ()) -> MCResult:
    """Reference eq. 4: ``samples`` full passes ``generator(x, rows_t)`` with the rows of the fast path.

    Slower by the cost of the prefix times ``samples``; used to check and benchmark
    :class:`MonteCarloPredictor`, which must agree with it to float rounding.
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
        raise ConfigError(f"Monte Carlo samples must be an integer >= 2 (variance needs two), got {samples!r}")
    x = _check_images(x)
    seed, image_seeds = _resolve_seeds(seed, len(x))
    qs = tuple(float(q) for q in percentiles)
    full = tf.function(lambda images, rows: generator(images, seed=rows), reduce_retracing=True)
    images = tf.constant(x)
    moments = _Moments()
    kept, mean_half, var_half = [], None, None
    for t in range(samples):
        rows = tf.constant(seed_rows(image_seeds, t))
        y = full(images, rows).numpy()
        moments.merge(1, y, np.zeros_like(y))
        if qs:
            kept.append(y)
        if t + 1 == samples // 2:
            mean_half, var_half = moments.mean, moments.variance()
    pct = [np.percentile(np.stack(kept, axis=1), qs, axis=1)] if qs else []
    return _result([moments.mean], [moments.variance()], [mean_half], [var_half], pct, qs, samples, seed)
