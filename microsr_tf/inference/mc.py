"""Monte Carlo dropout posterior of the generator (paper eq. 4), exact and without redundant work.

The posterior of an image is always that of the whole image: every instance normalisation sees the
whole image, and dropout masks are drawn in whole-image coordinates. Nothing about how the work is cut
up (chunks of samples, stripes of rows, batches of images) changes the answer beyond float rounding.

Every sample shares the generator's deterministic prefix (everything before the first always-on
dropout), so the prefix runs once per image and only the stochastic suffix runs ``T`` times, on the
prefix features repeated along the batch axis in chunks sized to a memory budget. When the generator's
decoder is local (``decoder_norm="none"``: no statistics over the image after the dropout), the suffix
runs in full-width stripes of rows with a halo covering the decoder's reach (``decoder_reach``), which
bounds memory for large slices and keeps the working set near the caches. Mean and variance are accumulated chunk by chunk with
Chan's parallel merge of moments, so memory does not grow with ``T``. Sample ``t`` of an image with
seed ``s`` uses the dropout seed row ``[s, t]``, which makes the result equal to :func:`naive_predict`
(``T`` full passes with the same rows). ``samples="auto"`` stops each image at the first of a few
checkpoints where its posterior has converged (:class:`AutoSamples`); that result equals the fixed-``T``
one at the same ``T``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from microsr_tf.config import MAX_SEED
from microsr_tf.errors import ConfigError, InputError
from microsr_tf.models.dropout import image_seeds
from microsr_tf.models.generator import DOWNSCALE, with_precision

_LIVE_FACTOR = 3  # live activations of a conv stack ~ input + output + one skip of the largest tensor
AUTO_BUDGET_FRACTION = 0.5  # "auto" memory budget: this share of the memory available when predicting starts
# Stripes of a local decoder (measured at the paper's width on a 1832 px wide slice): 8 samples per pass
# and 32 or more trunk rows per stripe run within ~15% of the fastest layout; 8-row stripes lose a third
# to their halo rows, and larger chunks or taller stripes only add memory.
_MAX_STRIPE_CHUNK = 8  # samples per stripe pass
_STRIPE_BYTES = 2 << 30  # live activations one stripe pass of a chunk aims at
_MIN_OWNED_ROWS = 16  # trunk rows a stripe owns at least, so that its 3 halo rows stay a small share


@dataclass
class MCResult:
    """Posterior mean ``p`` and variance ``c`` of eq. 4 over ``samples`` dropout passes.

    ``mean``/``var`` are ``[N, H, W, 1]`` from :meth:`MonteCarloPredictor.predict` and ``[H, W]`` for a
    slice. ``percentiles`` maps q (0-100) to the per-pixel q-th percentile of the samples (only when
    asked for). ``convergence`` compares the moments after ``T // 2`` and ``T`` passes of each image
    (see :func:`convergence_figures`). ``image_samples`` is each image's ``T``: all ``samples`` for a
    fixed ``T``; with ``samples="auto"`` each image stops where it converged.
    """

    mean: np.ndarray
    var: np.ndarray
    samples: int
    seed: int | tuple[int, ...]
    percentiles: dict[float, np.ndarray] | None = None
    convergence: dict[str, float] = field(default_factory=dict)
    image_samples: tuple[int, ...] = ()  # T each image used (they differ under samples="auto"); samples is the most

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
    Variances below the float32 rounding of the samples (``(eps * max |mean|)^2``) count as zero, so a
    model whose samples all agree shows no change rather than a relative change of rounding noise.
    """
    tiny = np.finfo(np.float64).tiny
    dm = np.abs(np.asarray(mean, np.float64) - mean_half)
    dv = np.abs(np.asarray(var, np.float64) - var_half)
    rounding = (float(np.finfo(np.float32).eps) * float(np.abs(mean).max(initial=0.0))) ** 2
    dv = np.where(dv > rounding, dv, 0.0)
    return {
        "mean_rel_change": float(dm.mean() / max(float(np.abs(mean).mean()), tiny)),
        "mean_max_change": float(dm.max()),
        "var_rel_change": float(dv.mean() / max(float(np.mean(var)), rounding, tiny)),
        "var_max_rel_change": float(dv.max() / max(float(np.max(var)), rounding, tiny)),
    }


@dataclass(frozen=True)
class AutoSamples:
    """``samples="auto"``: sample each image until its posterior has converged, at most ``max_samples``.

    Convergence is checked at about every factor sqrt(2) of ``T`` up to ``max_samples`` and from
    ``min_samples`` on (for 100: ``T`` = 12, 17, 25, 35, 50, 71, 100), each time with
    :func:`convergence_figures` between ``T // 2`` and ``T`` samples. An image stops at the first ``T``
    where its posterior mean moved by at most ``mean_tolerance`` of its average magnitude
    (``mean_rel_change``) and its variance by at most ``var_tolerance`` of its average
    (``var_rel_change``); the result is then exactly the fixed-``T`` posterior at that ``T``.

    Both figures shrink like ``1/sqrt(T)``. The mean's is about ``0.8 * noise / intensity / sqrt(T)``,
    so images whose dropout noise is small beside their intensity stop first; the variance's is about
    ``1.1 / sqrt(T)`` for Gaussian noise of any size (1.7 for the bundled model), so ``var_tolerance``
    sets how many samples any noisy image needs. The defaults let the variance move by a quarter and
    the mean by 2%: the bundled model stops its phantom slices at ``T`` = 35 (``T`` = 100 reaches
    0.004 and 0.13; ``benchmarks/bench_auto_samples.py``). An image whose samples all agree stops at
    the first check.
    """

    max_samples: int = 100
    min_samples: int = 10
    mean_tolerance: float = 0.02
    var_tolerance: float = 0.25

    def __post_init__(self):
        for name in ("max_samples", "min_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
                raise ConfigError(f"AutoSamples.{name} must be an integer >= 2, got {value!r}")
        if self.min_samples > self.max_samples:
            raise ConfigError(f"AutoSamples.min_samples ({self.min_samples}) exceeds max_samples ({self.max_samples})")
        for name in ("mean_tolerance", "var_tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"AutoSamples.{name} must be a number >= 0, got {value!r}")

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """The ``T`` at which convergence is checked, in order: ``max_samples`` and ``round(max_samples /
        sqrt(2))``, each halved again and again while at least ``min_samples``; ``max_samples`` is the last."""
        points = {self.max_samples}
        for start in (self.max_samples, round(self.max_samples / math.sqrt(2))):
            t = start
            while t >= self.min_samples:
                points.add(t)
                t //= 2
        return tuple(sorted(points))

    def converged(self, figures: dict[str, float]) -> bool:
        """Whether :func:`convergence_figures` between ``T // 2`` and ``T`` meet both tolerances."""
        return figures["mean_rel_change"] <= self.mean_tolerance and figures["var_rel_change"] <= self.var_tolerance


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


def available_memory_mb() -> float:
    """Memory the system can give a new allocation now (Linux ``MemAvailable``; else physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def resolve_memory_budget(budget: float | str) -> float:
    """A memory budget in MB: a positive number, or ``"auto"`` (half the memory available now)."""
    if isinstance(budget, str):
        if budget.strip().lower() == "auto":
            return max(64.0, AUTO_BUDGET_FRACTION * available_memory_mb())
        try:
            budget = float(budget)
        except ValueError:
            raise ConfigError(f"memory budget must be 'auto' or a number of MB, got {budget!r}") from None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ConfigError(f"memory_budget_mb must be a positive number of MB or 'auto', got {budget!r}")
    return float(budget)


def is_deterministic(generator) -> bool:
    """Whether ``generator`` has no dropout that acts (a baseline, or a generator without dropout)."""
    return getattr(generator, "n_dropout_layers", None) == 0 or getattr(generator, "deterministic", False) is True


def _check_images(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 1 or x.shape[0] < 1:
        raise InputError(None, f"expected images of shape [N, H, W, 1], got {x.shape}")
    if x.shape[1] % DOWNSCALE or x.shape[2] % DOWNSCALE:
        raise InputError(None, f"image height and width must be multiples of {DOWNSCALE} for the generator, "
                               f"got {x.shape[1]}x{x.shape[2]} (pad the slice, as inference.stitching does)")
    return x


def resolve_seed(seed: int | None) -> int:
    """A valid Monte Carlo seed in [0, 2^31 - 1]: ``seed`` checked, or a random one when it is ``None``."""
    if seed is None:
        return int(np.random.default_rng().integers(0, MAX_SEED))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"Monte Carlo seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return int(seed)


def _resolve_seeds(seed, n: int) -> tuple[int | tuple[int, ...], np.ndarray]:
    """``(seed as recorded, [n] int32 per-image seeds)`` from an int, ``None`` or one int per image.

    One int is a base seed: image ``b`` of the batch gets :func:`~microsr_tf.models.dropout.image_seeds`
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
    """Bytes of the largest per-example tensor in a graph traced with a ``None`` batch dimension.

    Floating tensors count at least 4 bytes an element: the fused kernels (instance norm, output head)
    compute in float32 inside, on temporaries the graph does not show, whatever their inputs' dtype.
    """
    largest = 0
    for op in graph.get_operations():
        for t in op.outputs:
            dims = t.shape.as_list() if t.shape.rank else None
            if not dims or dims[0] is not None or None in dims[1:]:
                continue
            if not (t.dtype.is_floating or t.dtype.is_integer or t.dtype == tf.bool):
                continue
            size = max(t.dtype.size, 4) if t.dtype.is_floating else t.dtype.size
            largest = max(largest, math.prod(dims[1:]) * size)
    return largest


def _spec_bytes(specs) -> int:
    return sum(math.prod(s.shape.as_list()[1:]) * s.dtype.size for s in tf.nest.flatten(specs))


@dataclass
class _Plan:
    """Per image size: the traced functions and what one image's one pass costs in memory.

    ``bytes_per_sample``: one whole-image suffix pass. With a local decoder, ``bytes_per_window_row`` is
    one sample's live memory per trunk row of a stripe's window, and ``trunk_bytes`` one sample's whole
    trunk output (held while its stripes are decoded; none for bottleneck dropout, whose stripes start
    from the shared prefix features).
    """

    prefix: Callable
    chunk: Callable
    bytes_per_sample: int
    prefix_bytes: int
    stripe: Callable | None = None
    trunk: Callable | None = None
    bytes_per_window_row: int = 0
    trunk_bytes: int = 0


def resolve_samples(samples) -> tuple[int, AutoSamples | None]:
    """``(largest T, stopping rule or None)`` from an int ``>= 2``, ``"auto"`` or an :class:`AutoSamples`."""
    if isinstance(samples, AutoSamples):
        return samples.max_samples, samples
    if isinstance(samples, str) and samples.strip().lower() == "auto":
        auto = AutoSamples()
        return auto.max_samples, auto
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
        raise ConfigError(f"Monte Carlo samples must be an integer >= 2 (variance needs two) or 'auto', got {samples!r}")
    return int(samples), None


class MonteCarloPredictor:
    """Posterior mean and variance of a generator's outputs over ``samples`` MC dropout passes.

    ``generator`` follows the ``ResnetGenerator`` contract (``deterministic_prefix`` /
    ``stochastic_suffix`` with per-example ``[B, 2]`` seed rows); one that also offers a local decoder
    (``local_decoder``, ``decoder_reach``, ``trunk_suffix``, ``decode``) is run in stripes. ``samples`` is
    ``T``, or ``"auto"`` / an :class:`AutoSamples` to sample each image until it has converged.
    ``seed=None`` draws a fresh seed per :meth:`predict` call (recorded in the result). ``chunk_size``
    fixes how many samples run per suffix call; ``None`` sizes chunks to ``memory_budget_mb`` (MB, or
    ``"auto"``: half the memory available at construction), estimated from the traced graphs. ``stripe``
    fixes the height in output pixels of the stripes a local decoder runs in (a multiple of 4); ``None``
    sizes them to the caches within the budget. Neither changes the result. Percentiles need the raw
    samples, so asking for them keeps all ``samples`` outputs in host memory (``N * samples * H * W * 4``
    bytes); without them memory does not grow with ``samples``. ``precision="bfloat16"`` runs the
    stochastic suffix's convolutions in bfloat16 (see :func:`~microsr_tf.models.generator.with_precision`);
    the prefix, which runs once per image, stays float32, and so do the outputs and the moments.
    """

    def __init__(self, generator, samples: int | str | AutoSamples = 100, seed: int | None = None,
                 chunk_size: int | None = None, memory_budget_mb: float | str = "auto",
                 percentiles: Sequence[float] = (), jit_compile: bool = False, precision: str = "float32",
                 stripe: int | None = None):
        max_samples, auto = resolve_samples(samples)
        if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
            raise ConfigError(f"Monte Carlo chunk_size must be a positive integer or None, got {chunk_size!r}")
        if stripe is not None and (isinstance(stripe, bool) or not isinstance(stripe, (int, np.integer))
                                   or stripe < DOWNSCALE or stripe % DOWNSCALE):
            raise ConfigError(f"stripe height must be a multiple of {DOWNSCALE} pixels >= {DOWNSCALE}, got {stripe!r}")
        qs = tuple(float(q) for q in percentiles)
        if any(not 0.0 <= q <= 100.0 for q in qs):
            raise ConfigError(f"percentiles must lie in [0, 100], got {list(percentiles)}")
        if seed is not None:
            resolve_seed(seed)
        self.generator = generator
        self.precision = precision
        self._suffix_generator = with_precision(generator, precision)
        self._feature_dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
        self.samples = max_samples
        self.auto = auto
        self.seed = seed
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.memory_budget_mb = resolve_memory_budget(memory_budget_mb)
        self.stripe = None if stripe is None else int(stripe)
        self.percentiles = qs
        self._prefix = tf.function(generator.deterministic_prefix)
        self._chunk = tf.function(self._chunk_moments, jit_compile=jit_compile)
        self.striped = (getattr(generator, "local_decoder", False) and getattr(generator, "n_dropout_layers", 0) > 0
                        and all(hasattr(generator, a) for a in ("decoder_reach", "trunk_suffix", "decode")))
        self._bottleneck = self.striped and generator.position == "bottleneck"
        if self.striped:
            self._reach = tuple(int(r) for r in generator.decoder_reach)
            self._stripe = tf.function(self._stripe_moments, jit_compile=jit_compile)
            self._trunk = tf.function(self._trunk_samples, jit_compile=jit_compile)
        self._plans: dict[tuple[int, int], _Plan] = {}

    @property
    def _budget_bytes(self) -> float:
        return self.memory_budget_mb * 2**20

    @property
    def _checkpoints(self) -> tuple[int, ...]:
        """The sample counts at which an image may stop (only the last for a fixed ``T``)."""
        return self.auto.checkpoints if self.auto is not None else (self.samples,)

    # ----- traced functions ---------------------------------------------------------------------------

    def _tile(self, features, k):
        return tf.nest.map_structure(lambda f: tf.repeat(tf.cast(f, self._feature_dtype), k, axis=0), features)

    @staticmethod
    def _rows(image_seeds, sample_ids):
        k, n = tf.shape(sample_ids)[0], tf.shape(image_seeds)[0]
        return tf.stack([tf.repeat(image_seeds, k), tf.tile(sample_ids, [n])], axis=1)

    @staticmethod
    def _moments(y, n, k):
        y = tf.reshape(y, tf.concat([[n, k], tf.shape(y)[1:]], axis=0))
        mean = tf.reduce_mean(y, axis=1)
        return mean, tf.reduce_sum(tf.square(y - mean[:, None]), axis=1), y

    def _chunk_moments(self, features, image_seeds, sample_ids):
        """Whole-image suffix on each image's features repeated once per sample id; chunk mean, M2, samples."""
        k, n = tf.shape(sample_ids)[0], tf.shape(image_seeds)[0]
        y = self._suffix_generator.stochastic_suffix(self._tile(features, k), self._rows(image_seeds, sample_ids))
        return self._moments(y, n, k)

    def _trunk_samples(self, features, image_seeds, sample_ids):
        """The stochastic trunk of every (image, sample) pair over the whole image: the decoder's input."""
        k = tf.shape(sample_ids)[0]
        return self._suffix_generator.trunk_suffix(self._tile(features, k), self._rows(image_seeds, sample_ids))

    def _stripe_moments(self, window, image_seeds, sample_ids, row_offset):
        """Decoder over one window of trunk rows for every sample; chunk mean, M2 and samples of its output.

        Bottleneck dropout: ``window`` holds the images' prefix features and the dropout draws the
        whole image's mask at ``row_offset``. Otherwise it holds the trunk output of every
        (image, sample) pair, already stochastic.
        """
        k, n = tf.shape(sample_ids)[0], tf.shape(image_seeds)[0]
        if self._bottleneck:
            window = self._suffix_generator.trunk_suffix(self._tile((window,), k), self._rows(image_seeds, sample_ids),
                                                         row_offset=row_offset)
        return self._moments(self._suffix_generator.decode(tf.cast(window, self._feature_dtype)), n, k)

    # ----- planning -------------------------------------------------------------------------------------

    def _plan(self, height: int, width: int) -> _Plan:
        """Trace the functions once per image size (batch ``None``) and estimate their memory."""
        key = (int(height), int(width))
        if key in self._plans:
            return self._plans[key]
        prefix = self._prefix.get_concrete_function(tf.TensorSpec([None, *key, 1], tf.float32))
        feature_specs = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), prefix.structured_outputs)
        ids = tf.TensorSpec([None], tf.int32)
        chunk = self._chunk.get_concrete_function(feature_specs, ids, ids)
        hidden = int(getattr(self.generator, "hidden_bytes_per_pixel", 0))  # fused kernels' own temporaries
        out_bytes = math.prod(key) * (4 + hidden)
        feature_bytes = _spec_bytes(feature_specs)
        plan = _Plan(prefix=prefix, chunk=chunk,
                     bytes_per_sample=feature_bytes + out_bytes + _LIVE_FACTOR * _per_example_bytes(chunk.graph),
                     prefix_bytes=feature_bytes + _LIVE_FACTOR * _per_example_bytes(prefix.graph))
        if self.striped:
            h4, w4 = key[0] // DOWNSCALE, key[1] // DOWNSCALE
            if self._bottleneck:
                window_spec = tf.TensorSpec([None, None, w4, feature_specs[0].shape[-1]], feature_specs[0].dtype)
            else:
                plan.trunk = self._trunk.get_concrete_function(feature_specs, ids, ids)
                trunk_out = plan.trunk.structured_outputs
                window_spec = tf.TensorSpec([None, None, w4, trunk_out.shape[-1]], trunk_out.dtype)
                plan.trunk_bytes = math.prod(trunk_out.shape.as_list()[1:]) * trunk_out.dtype.size
            plan.stripe = self._stripe.get_concrete_function(window_spec, ids, ids, tf.TensorSpec([], tf.int32))
            probe_rows = min(h4, sum(self._reach) + 1)
            probe = self._stripe.get_concrete_function(
                tf.TensorSpec([None, probe_rows, w4, window_spec.shape[-1]], window_spec.dtype), ids, ids,
                tf.TensorSpec([], tf.int32))
            per_row = (_LIVE_FACTOR * _per_example_bytes(probe.graph) / probe_rows
                       + w4 * window_spec.shape[-1] * window_spec.dtype.size + DOWNSCALE**2 * w4 * (4 + hidden))
            plan.bytes_per_window_row = int(math.ceil(per_row))
        self._plans[key] = plan
        return plan

    def bytes_per_sample(self, height: int, width: int) -> int:
        """Estimated memory of one image's one Monte Carlo pass at ``height x width``, from the traced graphs:
        the whole image, or, with a local decoder, the smallest stripe."""
        plan = self._plan(height, width)
        if self.striped:
            return plan.trunk_bytes + plan.bytes_per_window_row * min(height // DOWNSCALE, sum(self._reach) + 1)
        return plan.bytes_per_sample

    def _kept_bytes(self, height: int, width: int) -> int:
        """Host memory of one image's raw samples, kept for percentiles (and their stacked copy)."""
        return 2 * self.samples * height * width * 4 if self.percentiles else 0

    def _image_bytes(self, height: int, width: int) -> int:
        """Memory one ``height x width`` image needs: its prefix, one Monte Carlo pass, and all its samples
        when percentiles are asked for."""
        return (self._plan(height, width).prefix_bytes + self.bytes_per_sample(height, width)
                + self._kept_bytes(height, width))

    def fits(self, height: int, width: int) -> bool:
        """Whether the prefix and one Monte Carlo pass of one ``height x width`` image fit the memory budget,
        with all its samples when percentiles are asked for."""
        return self._image_bytes(height, width) <= self._budget_bytes

    def require_fit(self, height: int, width: int) -> None:
        """ConfigError, saying how much memory is needed, unless a ``height x width`` image :meth:`fits`."""
        if not self.fits(height, width):
            what = f"with its {self.samples} samples kept for percentiles " if self.percentiles else ""
            need = self._image_bytes(height, width) / 2**20
            budget = self.memory_budget_mb
            shown = f"{budget:.0f}" if budget >= 1 else f"{budget:.2g}"
            raise ConfigError(
                f"one {height}x{width} Monte Carlo pass {what}needs about {need:.0f} MB, over the memory budget of "
                f"{shown} MB (memory_budget_mb / --memory-budget); raise the budget")

    # ----- prediction -----------------------------------------------------------------------------------

    def predict(self, x, seed: int | Sequence[int] | None = None) -> MCResult:
        """Eq. 4 for each image of ``x`` (``[N, H, W, 1]``, H and W multiples of 4, values in [0, 1]).

        ``seed`` overrides the predictor's seed for this call: one base int for the batch (image ``b``
        uses ``image_seeds(seed, N)[b]``), or one int per image; ``None`` with no predictor seed draws a
        random one. With ``samples="auto"`` every image stops at its own ``T`` (``image_samples``).
        """
        x = _check_images(x)
        seed, seeds = _resolve_seeds(self.seed if seed is None else seed, len(x))
        n, h, w, _ = x.shape
        if is_deterministic(self.generator):
            return self._deterministic(x, seed)
        plan = self._plan(h, w)
        self.require_fit(h, w)
        group = max(1, min(n, int(self._budget_bytes // self._image_bytes(h, w))))
        if self.auto is not None:
            group = 1  # every image stops on its own
        results = {"mean": [], "var": [], "mean_half": [], "var_half": [], "kept": [], "used": []}
        for g0 in range(0, n, group):
            features = plan.prefix(tf.constant(x[g0:g0 + group]))
            group_seeds = tf.constant(seeds[g0:g0 + group])
            budget = self._budget_bytes - len(seeds[g0:g0 + group]) * plan.prefix_bytes
            passes = (self._striped_passes(plan, features, group_seeds, budget, h, w) if self.striped
                      else self._whole_passes(plan, features, group_seeds, budget))
            _accumulate(passes, self._checkpoints, self.auto, results, self.percentiles)
        return _result(results, self.percentiles, seed)

    def _deterministic(self, x: np.ndarray, seed) -> MCResult:
        """A network without dropout: every sample is the same pass, so one pass gives the exact mean and a
        variance of exactly 0 (T copies would only add float rounding to it)."""
        mean = self._prefix(tf.constant(x))[0].numpy().astype(np.float32)
        zeros = np.zeros_like(mean)
        pct = {q: mean for q in self.percentiles} or None
        conv = convergence_figures(mean, zeros, mean, zeros)
        return MCResult(mean=mean, var=zeros, samples=self.samples, seed=seed, percentiles=pct, convergence=conv)

    def _bounds(self, chunk: int) -> Iterator[tuple[int, int]]:
        """Sample-id ranges of at most ``chunk`` samples, split at every checkpoint ``T`` and at ``T // 2``
        (for the convergence figures); generated as they are used, so a huge ``T`` costs no memory."""
        stops = sorted({c for c in self._checkpoints} | {c // 2 for c in self._checkpoints})
        start = 0
        for stop in stops:
            for a in range(start, stop, chunk):
                yield a, min(a + chunk, stop)
            start = stop

    def _whole_passes(self, plan: _Plan, features, group_seeds, budget: float):
        n = int(group_seeds.shape[0])
        chunk = self.chunk_size or max(1, min(self.samples - self.samples // 2,
                                              int(budget // (n * plan.bytes_per_sample))))
        for a, b in self._bounds(chunk):
            yield (a, b) + tuple(t.numpy() for t in plan.chunk(features, group_seeds, tf.range(a, b, dtype=tf.int32)))

    def _stripe_layout(self, plan: _Plan, n: int, budget: float, h4: int) -> tuple[int, int]:
        """``(samples per chunk, trunk rows each stripe owns)`` for ``n`` images within ``budget`` bytes.

        A stripe reads ``sum(decoder_reach)`` rows more than it owns, so taller stripes waste less; but
        a chunk's stripe should stay near :data:`_STRIPE_BYTES` of live activations, which keeps the
        decoder's working set in the caches (measured in ``benchmarks/bench_tiling.py``). Every window has
        the same height (one trace), so the stripes share the rows evenly: a last stripe owning a few
        rows would still compute a whole window.
        """
        halo = sum(self._reach)
        chunk = self.chunk_size or min(self.samples - self.samples // 2, _MAX_STRIPE_CHUNK)
        per_chunk = lambda c: n * c * (plan.trunk_bytes + plan.bytes_per_window_row * (halo + 1))  # noqa: E731
        while chunk > 1 and per_chunk(chunk) > budget:
            chunk //= 2
        if self.stripe is not None:
            owned = max(1, self.stripe // DOWNSCALE)
        else:
            fitting = int((budget / (n * chunk) - plan.trunk_bytes) // plan.bytes_per_window_row) - halo
            cached = int(_STRIPE_BYTES // (n * chunk * plan.bytes_per_window_row)) - halo
            owned = max(1, min(fitting, max(cached, _MIN_OWNED_ROWS)))
            owned = math.ceil(h4 / math.ceil(h4 / owned))  # as many stripes, sharing the rows evenly
        return chunk, min(owned, h4)

    def _striped_passes(self, plan: _Plan, features, group_seeds, budget: float, h: int, w: int):
        """Chunks of samples, each decoded stripe by stripe; yields whole-image chunk moments."""
        n = int(group_seeds.shape[0])
        h4 = h // DOWNSCALE
        above, below = self._reach
        chunk, owned = self._stripe_layout(plan, n, budget, h4)
        window = min(h4, owned + above + below)
        for a, b in self._bounds(chunk):
            ids = tf.range(a, b, dtype=tf.int32)
            source = features[0] if self._bottleneck else plan.trunk(features, group_seeds, ids)
            mean = np.empty((n, h, w, 1), np.float32)
            m2 = np.empty_like(mean)
            kept = np.empty((n, b - a, h, w, 1), np.float32) if self.percentiles else None
            for r0 in range(0, h4, owned):
                r1 = min(r0 + owned, h4)
                top = min(max(0, r0 - above), h4 - window)  # every window has the same height
                c_mean, c_m2, y = plan.stripe(source[:, top:top + window], group_seeds, ids, tf.constant(top, tf.int32))
                rows = slice((r0 - top) * DOWNSCALE, (r1 - top) * DOWNSCALE)
                out = slice(r0 * DOWNSCALE, r1 * DOWNSCALE)
                mean[:, out], m2[:, out] = c_mean.numpy()[:, rows], c_m2.numpy()[:, rows]
                if kept is not None:
                    kept[:, :, out] = y.numpy()[:, :, rows]
            yield a, b, mean, m2, kept


def _accumulate(passes, checkpoints: Sequence[int], auto: AutoSamples | None, results: dict,
                qs: tuple[float, ...]) -> None:
    """Merge one image group's chunks ``(a, b, mean, m2, samples)`` into ``results`` up to the first of
    ``checkpoints`` where ``auto`` says the group has converged (the last one without ``auto``), with the
    percentiles ``qs`` of the group's samples when asked for."""
    moments = _Moments()
    samples = [] if qs else None
    halves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for a, b, c_mean, c_m2, y in passes:
        moments.merge(b - a, c_mean, c_m2)
        if samples is not None:
            samples.append(y)
        if b in {c // 2 for c in checkpoints}:
            halves[b] = (moments.mean, moments.variance())
        if b in checkpoints and (b == checkpoints[-1] or (
                auto is not None and auto.converged(convergence_figures(*halves[b // 2], moments.mean,
                                                                        moments.variance())))):
            break
    half_mean, half_var = halves[moments.count // 2]
    results["mean_half"].append(half_mean)
    results["var_half"].append(half_var)
    results["mean"].append(moments.mean)
    results["var"].append(moments.variance())
    results["used"] += [moments.count] * len(moments.mean)
    if samples is not None:
        results["kept"].append(np.percentile(np.concatenate(samples, axis=1), qs, axis=1))


def _result(results: dict, qs, seed) -> MCResult:
    mean = np.concatenate(results["mean"]).astype(np.float32)
    var = np.concatenate(results["var"]).astype(np.float32)
    percentiles = None
    if qs:
        stacked = np.concatenate(results["kept"], axis=1).astype(np.float32)
        percentiles = {q: stacked[i] for i, q in enumerate(qs)}
    conv = convergence_figures(np.concatenate(results["mean_half"]), np.concatenate(results["var_half"]), mean, var)
    used = tuple(int(t) for t in results["used"])
    return MCResult(mean=mean, var=var, samples=max(used), seed=seed, percentiles=percentiles, convergence=conv,
                    image_samples=used)


def naive_predict(generator, x, samples: int = 100, seed: int | Sequence[int] | None = None,
                  percentiles: Sequence[float] = ()) -> MCResult:
    """Reference eq. 4: ``samples`` full passes ``generator(x, rows_t)`` with the rows of the fast path.

    Slower by the cost of the prefix times ``samples``; the reference that tests and benchmarks hold
    :class:`MonteCarloPredictor` to (it must agree to float rounding).
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
        raise ConfigError(f"Monte Carlo samples must be an integer >= 2 (variance needs two), got {samples!r}")
    x = _check_images(x)
    seed, seeds = _resolve_seeds(seed, len(x))
    qs = tuple(float(q) for q in percentiles)
    full = tf.function(lambda images, rows: generator(images, seed=rows), reduce_retracing=True)
    images = tf.constant(x)
    results = {"mean": [], "var": [], "mean_half": [], "var_half": [], "kept": [], "used": []}

    def passes():
        for t in range(samples):
            y = full(images, tf.constant(seed_rows(seeds, t))).numpy()
            yield t, t + 1, y, np.zeros_like(y), y[:, None]

    _accumulate(passes(), (int(samples),), None, results, qs)
    return _result(results, qs, seed)
