"""Export a trained generator as a versioned SavedModel that the stock TF-Serving runs as it is.

Layout (what TF-Serving expects under a model's base path)::

    BASE/<version>/saved_model.pb, variables/      the graph and weights
    BASE/<version>/assets.extra/microsr_meta.json   spacings, intensity statistics, model config, limits

Signatures (every input is checked in the graph, so any server answers a bad request with
INVALID_ARGUMENT and a message that says what was expected):

- ``serving_default(image)`` -> ``{"mean", "variance"}``: normalised slices on the HR grid
  (``[B, H, W, 1]`` float32 in [0, 1], H and W multiples of 4 and at least 8), the exported default
  number of Monte Carlo samples, a fresh random seed per request (seeded anew at every load);
- ``mc_seeded(image, samples, seed)`` -> the same with an explicit sample count and seed;
- ``mc_scanner(lr_image, spacing, samples, seed)`` -> ``{"mean", "variance", "std"}`` in HR units on
  the HR grid, from LR slices in the scanner's units (``[B, h, w, 1]`` float32) and their in-plane
  spacing in mm: the graph resamples (Keys bicubic, as ``predict``), normalises with the training
  scans' pooled statistics (``lr_stats``), pads, runs the posterior and maps back to HR units, so a
  client needs no Python. Exported only when the model's metadata holds ``lr_stats``;
- ``metadata(probe)`` -> ``{"json"}``: the model's metadata (the ``assets.extra`` file), one copy per
  entry of ``probe``, for clients that have no copy of the export (``microsr-tf predict --server``).

``samples`` and ``seed`` are int32 scalars (one base seed: image ``b`` uses
``image_seeds(seed, B)[b]``, image 0 the seed itself -- the convention of
:class:`microsr_tf.inference.mc.MonteCarloPredictor`) or one value per image (``[B]``: image ``b``
uses ``seed[b]``); ``spacing`` is ``[2]`` or ``[B, 2]``. The per-image forms are what TF-Serving's
request batching needs, which concatenates requests along the first dimension. ``samples`` must lie
in [2, :data:`MAX_SAMPLES`] and a request may hold at most ``max_pixels`` HR pixels.

Graphs are traced with ``ResnetGenerator.xla_kernels = False``: no function is marked
``_XlaMustCompile``, which the stock ``tensorflow_model_server`` refuses to run unless started with
``--xla_cpu_compilation_enabled``. The SavedModel also carries the generator's weights and ``prefix``
and ``suffix`` functions, and its metadata the generator's config, so :func:`load_model` can hand
``microsr-tf predict`` the Keras generator again (with its fast kernels).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import tensorflow as tf

from .config import MAX_SEED, MAX_SERVED_SAMPLES
from .errors import InputError
from .files import atomic_directory
from .inference.predict import FACTOR_TOLERANCE, FEATURELESS_SPAN
from .models.artifact import (GENERATOR_CLASSES, check_prediction_meta, generator_file, load_generator, meta_path_for,
                              read_meta)
from .models.dropout import image_seeds_tf
from .models.generator import ResnetGenerator
from .preprocessing import IntensityStats
from .volumes import make_output_dir

META_FILE = "microsr_meta.json"
MAX_SAMPLES = MAX_SERVED_SAMPLES  # Monte Carlo samples one request may ask for
DEFAULT_MAX_PIXELS = 4096 * 4096  # HR pixels (B * H * W) one request may hold
MIN_SIZE = 8  # HR height and width: the generator's quarter-resolution layers reflect-pad by one pixel
SIGNATURES = ("serving_default", "mc_seeded", "mc_scanner", "metadata")

# Unknown ranks on purpose: the graph checks rank, shape and range itself and says what it expected
# (a declared rank would let the graph optimiser fold those checks away on the official server).
_IMAGE = tf.TensorSpec(None, tf.float32, name="image")
_LR_IMAGE = tf.TensorSpec(None, tf.float32, name="lr_image")
_SPACING = tf.TensorSpec(None, tf.float32, name="spacing")
_SAMPLES = tf.TensorSpec(None, tf.int32, name="samples")
_SEED = tf.TensorSpec(None, tf.int32, name="seed")
_F64 = tf.float64


class _Checks:
    """Input checks that fail in order: a check can only fail once every earlier one has passed, so the
    error names the first problem whatever order the runtime executes the assertions in. Conditions
    are computed so that they are valid for inputs of any shape."""

    def __init__(self):
        self.ok = tf.constant(True)
        self.ops: list = []

    def require(self, condition, message: str, *values) -> None:
        """Fail with ``message`` (``{}`` placeholders filled with ``values``) unless ``condition`` holds."""
        text = tf.strings.format(message, values) if values else tf.constant(message)
        self.ops.append(tf.debugging.Assert(tf.logical_or(tf.logical_not(self.ok), condition), [text]))
        self.ok = tf.logical_and(self.ok, condition)

    def gate(self, tensor):
        """``tensor`` once every check so far has passed."""
        with tf.control_dependencies(self.ops):
            return tf.identity(tensor)


def _dims(x, rank: int):
    """The first ``rank`` entries of ``tf.shape(x)``, zero-filled, valid for any rank of ``x``."""
    return tf.reshape(tf.concat([tf.shape(x), tf.zeros([rank], tf.int32)], axis=0)[:rank], [rank])


def _as_images(x):
    """Checked images with the static shape ``[None, None, None, 1]`` the generator's layers need.

    A reshape, not ``tf.ensure_shape``: the graph optimiser reads an ensured shape back onto the input
    and would then fold the rank check away.
    """
    return tf.reshape(x, tf.concat([_dims(x, 3), [1]], axis=0))


def _check_images(checks: _Checks, x, name: str, min_size: int, multiple: int, max_pixels: int | None) -> None:
    """Rank, channel, sizes, pixel count and finiteness of ``[B, H, W, 1]`` images."""
    shape = tf.shape(x)
    n, h, w, c = tf.unstack(_dims(x, 4))
    what = f"{name} must be float32 [B, H, W, 1]"
    checks.require(tf.equal(tf.rank(x), 4), what + ", got shape {}", shape)
    checks.require(tf.equal(c, 1), what + " (one channel), got shape {}", shape)
    checks.require(n >= 1, what + " with at least one image, got shape {}", shape)
    checks.require(tf.logical_and(h >= min_size, w >= min_size),
                   f"{name} height and width must be at least {min_size}, got shape {{}}", shape)
    if multiple > 1:
        checks.require(tf.logical_and(tf.equal(h % multiple, 0), tf.equal(w % multiple, 0)),
                       f"{name} height and width must be multiples of {multiple}, got shape {{}}", shape)
    if max_pixels is not None:
        pixels = tf.cast(n, tf.int64) * tf.cast(h, tf.int64) * tf.cast(w, tf.int64)
        checks.require(pixels <= max_pixels, f"{name} holds {{}} pixels, more than the {max_pixels} one request "
                                             "may hold; send fewer or smaller slices", pixels)
    checks.require(tf.reduce_all(tf.math.is_finite(x)), f"{name} contains NaN or Inf values")


def _check_per_image(checks: _Checks, value, n, name: str, what: str) -> None:
    """A scalar, or one value per image (``[n]``)."""
    rank = tf.rank(value)
    checks.require(tf.logical_or(tf.equal(rank, 0), tf.logical_and(tf.equal(rank, 1), tf.equal(tf.size(value), n))),
                   f"{name} must be {what}: a scalar, or one per image [B] with B = {{}}, got shape {{}}",
                   n, tf.shape(value))


def _per_image(value, n):
    return tf.broadcast_to(tf.reshape(value, [-1]), [n])


def _check_samples(checks: _Checks, samples, n) -> None:
    _check_per_image(checks, samples, n, "samples", "an int32 count")
    checks.require(tf.reduce_all(tf.logical_and(samples >= 2, samples <= MAX_SAMPLES)),
                   f"samples must be in [2, {MAX_SAMPLES}] (a variance needs two), got {{}}", samples)


def _check_seed(checks: _Checks, seed, n) -> None:
    _check_per_image(checks, seed, n, "seed", "an int32 seed")
    checks.require(tf.reduce_all(seed >= 0), "seed must be in [0, 2147483647], got {}", seed)


def _image_seeds(seed, n):
    """Per-image dropout seeds: ``image_seeds(seed, n)`` for a scalar base seed, else ``seed`` itself."""
    seeds = _per_image(seed, n)
    return tf.cond(tf.equal(tf.rank(seed), 0), lambda: image_seeds_tf(seeds[0], n), lambda: seeds)


def _keys(t):
    """Keys cubic kernel, a = -0.5, written as :func:`microsr_tf.preprocessing._keys`."""
    t = tf.abs(t)
    near = (1.5 * t - 2.5) * t * t + 1.0
    far = ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
    return tf.where(t <= 1.0, near, tf.where(t < 2.0, far, tf.zeros_like(t)))


def _resample_axis(x, axis: int, size, factor):
    """Bicubic refinement of ``x`` (``[B, d1, d2]`` float64) along ``axis`` 1 or 2 by ``factor``.

    The 4-tap form of :func:`microsr_tf.preprocessing.resample_slice`: output ``j`` samples input
    position ``(j + 0.5) / f - 0.5``, the border replicated, ``round(size * f)`` outputs (half to even).
    """
    m = tf.cast(tf.round(tf.cast(size, _F64) * factor), tf.int32)
    pos = (tf.cast(tf.range(m), _F64) + 0.5) / factor - 0.5
    base = tf.floor(pos)
    taps = base[:, None] + tf.constant([-1.0, 0.0, 1.0, 2.0], _F64)[None, :]
    weights = _keys(pos[:, None] - taps)
    cols = tf.clip_by_value(tf.cast(taps, tf.int32), 0, size - 1)
    gathered = tf.gather(x, cols, axis=axis)  # axis 1: [B, m, 4, d2]; axis 2: [B, d1, m, 4]
    if axis == 1:
        return tf.reduce_sum(gathered * weights[None, :, :, None], axis=2)
    return tf.reduce_sum(gathered * weights[None, None, :, :], axis=3)


class _Untracked:
    """Holds the Keras generator out of sight of tf.Module's dependency tracking."""

    def __init__(self, generator):
        self.generator = generator


class _ServingModule(tf.Module):
    """The generator's prefix/suffix plus in-graph Monte Carlo moments, ready for tf.saved_model.save."""

    def __init__(self, generator, meta: dict[str, Any], samples: int, max_pixels: int, memory_budget_mb: float):
        super().__init__()
        self.meta_json = json.dumps(meta, sort_keys=True)
        generator.xla_kernels = False  # plain ops: the stock server does not compile XLA on CPU
        # Only the weights are tracked: saving the Keras model itself would also trace and store every
        # layer's call, which the serving graphs do not need and which triples the export time.
        self.generator_weights = [v.value for v in generator.weights]
        self._net = _Untracked(generator)
        self.default_samples = int(samples)
        self.max_pixels = int(max_pixels)
        self.budget_bytes = int(memory_budget_mb * 2**20)
        self.bytes_per_pixel = int(math.ceil(_bytes_per_pixel(generator)))
        self.hr_spacing = tuple(float(s) for s in meta["hr_spacing"])
        self.factors = tuple(float(f) for f in meta["factors"])
        self.hr_stats = IntensityStats.from_dict(meta["hr_stats"])
        self.lr_stats = IntensityStats.from_dict(meta["lr_stats"]) if meta.get("lr_stats") else None
        probe = generator.deterministic_prefix(tf.zeros([1, 8, 8, 1]))
        feature_specs = tuple(tf.TensorSpec([None, None, None, f.shape[-1]], f.dtype) for f in probe)
        if self.lr_stats is not None:  # only then: saving would trace it otherwise
            self.serve_scanner = tf.function(self._scanner, input_signature=[_LR_IMAGE, _SPACING, _SAMPLES, _SEED])
        self.prefix = tf.function(lambda image: tuple(generator.deterministic_prefix(image)),
                                  input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
        self.suffix = tf.function(lambda features, seed: generator.stochastic_suffix(features, seed),
                                  input_signature=[feature_specs, tf.TensorSpec([None, 2], tf.int32)])

    def _chunk(self, shape):
        """Samples per suffix call so that one call stays within the memory budget (at least 1)."""
        pixels = tf.cast(shape[0], tf.int64) * tf.cast(shape[1], tf.int64) * tf.cast(shape[2], tf.int64)
        fit = self.budget_bytes // tf.maximum(pixels * self.bytes_per_pixel, 1)
        return tf.cast(tf.clip_by_value(fit, 1, MAX_SAMPLES), tf.int32)

    def _moments(self, image, samples, seeds):
        """Per-image mean and population variance over ``samples[b]`` passes with seed rows ``[seeds[b], t]``.

        Chunks of passes are merged with Chan's parallel algorithm in float64; the loop runs to the
        largest count and each image keeps only its own first ``samples[b]`` passes, so a request
        merged into a batch by the server gets the passes it would get alone (equal up to float32
        rounding: a larger batch may run other convolution kernels). A constant image is
        returned as itself with variance 0 (see :func:`microsr_tf.inference.predict.featureless_result`).
        """
        features = tuple(self._net.generator.deterministic_prefix(image))
        shape = tf.shape(image)
        n = shape[0]
        chunk = self._chunk(shape)
        mean = tf.zeros(shape, _F64)
        m2 = tf.zeros(shape, _F64)
        count = tf.zeros([n], _F64)
        wanted = tf.reduce_max(samples)
        start = tf.constant(0, tf.int32)
        while start < wanted:
            k = tf.minimum(chunk, wanted - start)
            ids = tf.range(start, start + k, dtype=tf.int32)
            tiled = tuple(tf.repeat(f, k, axis=0) for f in features)
            rows = tf.stack([tf.repeat(seeds, k), tf.tile(ids, [n])], axis=1)
            y = tf.cast(self._net.generator.stochastic_suffix(tiled, rows), _F64)
            y = tf.reshape(y, tf.concat([[n, k], shape[1:]], axis=0))
            keep = tf.cast(ids[None, :] < samples[:, None], _F64)  # [n, k]
            kept = tf.reduce_sum(keep, axis=1)
            w = keep[:, :, None, None, None]
            c_mean = tf.reduce_sum(y * w, axis=1) / tf.maximum(kept, 1.0)[:, None, None, None]
            c_m2 = tf.reduce_sum(w * tf.square(y - c_mean[:, None]), axis=1)
            total = count + kept
            safe = tf.maximum(total, 1.0)
            delta = c_mean - mean
            mean = mean + delta * (kept / safe)[:, None, None, None]
            m2 = m2 + c_m2 + tf.square(delta) * (count * kept / safe)[:, None, None, None]
            count = total
            start += k
        mean, var = tf.cast(mean, tf.float32), tf.cast(m2 / count[:, None, None, None], tf.float32)
        # A featureless (constant) image comes back as itself with variance 0, as predict writes it.
        span = tf.reduce_max(image, axis=[1, 2, 3]) - tf.reduce_min(image, axis=[1, 2, 3])
        flat = (span <= FEATURELESS_SPAN)[:, None, None, None]
        return tf.where(flat, image, mean), tf.where(flat, tf.zeros_like(var), var)

    def _hr_grid(self, image, samples, seed):
        checks = _Checks()
        n = _dims(image, 1)[0]
        _check_images(checks, image, "image", MIN_SIZE, 4, self.max_pixels)
        _check_samples(checks, samples, n)
        _check_seed(checks, seed, n)
        image = _as_images(checks.gate(image))
        samples, seed = checks.gate(samples), checks.gate(seed)
        mean, var = self._moments(image, _per_image(samples, n), _image_seeds(seed, n))
        return {"mean": mean, "variance": var}

    @tf.function(input_signature=[_IMAGE])
    def serve(self, image):
        # An unseeded stateful op (seed attributes 0, 0) is seeded afresh from the OS each time a server
        # loads the model: a saved seed state, or a global seed set at export, would replay the same
        # sequence after every restart.
        seed = tf.raw_ops.RandomUniformInt(shape=tf.constant([], tf.int32), minval=tf.constant(0),
                                           maxval=tf.constant(MAX_SEED), seed=0, seed2=0)
        return self._hr_grid(image, tf.constant(self.default_samples), seed)

    @tf.function(input_signature=[_IMAGE, _SAMPLES, _SEED])
    def serve_seeded(self, image, samples, seed):
        return self._hr_grid(image, samples, seed)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32, name="probe")])
    def serve_metadata(self, probe):
        # One copy per entry of ``probe``: a signature without inputs could not pass the server's batcher.
        return {"json": tf.fill(tf.shape(probe), tf.constant(self.meta_json))}

    def _scanner(self, lr_image, spacing, samples, seed):
        checks = _Checks()
        n, h, w = tf.unstack(_dims(lr_image, 3))
        _check_images(checks, lr_image, "lr_image", 1, 1, None)
        factors = self._check_spacing(checks, spacing, n)
        out_h = tf.cast(tf.round(tf.cast(h, _F64) * factors[0]), tf.int32)
        out_w = tf.cast(tf.round(tf.cast(w, _F64) * factors[1]), tf.int32)
        pixels = tf.cast(n, tf.int64) * tf.cast(out_h, tf.int64) * tf.cast(out_w, tf.int64)
        checks.require(tf.logical_and(out_h >= MIN_SIZE, out_w >= MIN_SIZE),
                       f"lr_image is too small: its HR slice would be {{}}x{{}} pixels, at least {MIN_SIZE}x{MIN_SIZE} "
                       "are needed", out_h, out_w)
        checks.require(pixels <= self.max_pixels, f"lr_image would give {{}} HR pixels, more than the "
                                                  f"{self.max_pixels} one request may hold; send fewer slices", pixels)
        _check_samples(checks, samples, n)
        _check_seed(checks, seed, n)
        x = _as_images(checks.gate(lr_image))
        factors, samples, seed = checks.gate(factors), checks.gate(samples), checks.gate(seed)
        # As predict: resample in float64, round to float32, normalise in float64, round to float32.
        up = _resample_axis(tf.cast(x[..., 0], _F64), 1, h, factors[0])
        up = tf.cast(_resample_axis(up, 2, w, factors[1]), tf.float32)
        lr = self.lr_stats
        z = (tf.cast(up, _F64) - lr.mean) / lr.std
        u = tf.cast(tf.clip_by_value((z - lr.low) / (lr.high - lr.low), 0.0, 1.0), tf.float32)
        pad_h, pad_w = (-out_h) % 4, (-out_w) % 4  # reflect at the bottom/right, as whole-slice prediction
        padded = tf.pad(u[..., None], [[0, 0], [0, pad_h], [0, pad_w], [0, 0]], mode="REFLECT")
        mean, var = self._moments(padded, _per_image(samples, n), _image_seeds(seed, n))
        mean, var = mean[:, :out_h, :out_w], var[:, :out_h, :out_w]
        hr = self.hr_stats
        mean_hr = tf.cast((tf.cast(mean, _F64) * (hr.high - hr.low) + hr.low) * hr.std + hr.mean, tf.float32)
        return {"mean": mean_hr, "variance": var * tf.constant(hr.scale ** 2, tf.float32),
                "std": tf.sqrt(var) * tf.constant(hr.scale, tf.float32)}

    def _check_spacing(self, checks: _Checks, spacing, n):
        """Refinement factors ``max(spacing / hr_spacing, 1)`` after checking shape, values and the trained factors."""
        rank = tf.rank(spacing)
        checks.require(tf.logical_or(tf.logical_and(tf.equal(rank, 1), tf.equal(tf.size(spacing), 2)),
                                     tf.logical_and(tf.equal(rank, 2),
                                                    tf.reduce_all(tf.equal(_dims(spacing, 2), tf.stack([n, 2]))))),
                       "spacing must be the in-plane voxel spacing in mm, [2] or one row per image [B, 2] with "
                       "B = {}, got shape {}", n, tf.shape(spacing))
        flat = tf.cast(tf.reshape(spacing, [-1]), _F64)
        first = tf.concat([flat, tf.ones([2], _F64)], axis=0)[:2]  # valid whatever the shape
        checks.require(tf.reduce_all(tf.logical_and(tf.math.is_finite(flat), flat > 0)),
                       "spacing must be positive numbers in mm, got {}", spacing)
        pattern = tf.tile(first, [tf.size(flat) // 2 + 1])[:tf.size(flat)]
        checks.require(tf.reduce_all(tf.equal(flat, pattern)),
                       "all images of one request need the same spacing, got {}", spacing)
        factors = tf.maximum(first / tf.constant(self.hr_spacing, _F64), 1.0)
        trained = tf.constant(self.factors, _F64)
        checks.require(tf.reduce_all(tf.abs(factors - trained) <= FACTOR_TOLERANCE * trained),
                       f"spacing {{}} mm needs upsampling factors {{}} to the model's HR spacing "
                       f"{list(self.hr_spacing)} mm, but the model was trained for factors {list(self.factors)}",
                       tf.cast(first, tf.float32), tf.cast(factors, tf.float32))
        return factors


def _bytes_per_pixel(generator, size: int = 64) -> float:
    """Memory of one whole-image Monte Carlo pass per HR pixel, read from the graphs traced at ``size``:
    the repeated prefix features, the output and three copies of the largest activation (input, output
    and a skip of a convolution stack), the estimate :class:`~microsr_tf.inference.mc.MonteCarloPredictor`
    makes for whole-image passes."""
    prefix = tf.function(generator.deterministic_prefix).get_concrete_function(
        tf.TensorSpec([None, size, size, 1], tf.float32))
    specs = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), prefix.structured_outputs)
    suffix = tf.function(generator.stochastic_suffix).get_concrete_function(specs, tf.TensorSpec([None, 2], tf.int32))

    def largest(graph) -> int:
        sizes = [math.prod(t.shape[1:]) * t.dtype.size for op in graph.get_operations() for t in op.outputs
                 if t.shape.rank and t.shape[0] is None and t.shape[1:].is_fully_defined()
                 and (t.dtype.is_floating or t.dtype.is_integer or t.dtype == tf.bool)]
        return max(sizes, default=0)

    features = sum(math.prod(s.shape[1:]) * s.dtype.size for s in tf.nest.flatten(specs))
    per_pass = features + size * size * 4 + 3 * max(largest(prefix.graph), largest(suffix.graph))
    return per_pass / float(size * size)


def export_saved_model(model_path: str | os.PathLike, base_dir: str | os.PathLike, version: int | None = None,
                       samples: int = 100, max_pixels: int = DEFAULT_MAX_PIXELS,
                       memory_budget_mb: float = 1024) -> Path:
    """Export the generator at ``model_path`` (run dir or ``.keras``) to ``base_dir/<version>``.

    ``version`` defaults to one more than the highest existing version. ``samples`` is the default
    of ``serving_default``; ``max_pixels`` caps the HR pixels of one request and
    ``memory_budget_mb`` sizes the chunks of Monte Carlo passes the server runs at once. Written to a
    temporary directory and renamed, so a failed export leaves no partial version behind. The
    metadata lists the signatures exported (``mc_scanner`` needs ``lr_stats`` in the model's metadata).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or not 2 <= samples <= MAX_SAMPLES:
        raise InputError(None, f"samples must be an integer in [2, {MAX_SAMPLES}], got {samples!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 16:
        raise InputError(None, f"max_pixels must be an integer >= 16, got {max_pixels!r}")
    if not (isinstance(memory_budget_mb, (int, float)) and math.isfinite(memory_budget_mb) and memory_budget_mb > 0):
        raise InputError(None, f"memory_budget_mb must be a positive number, got {memory_budget_mb!r}")
    exported = find_version_dir(model_path)
    if exported is not None:
        raise InputError(model_path, f"is already an exported SavedModel (version folder {exported.name}); serve it "
                                     "as it is, or export from the training run directory or its .keras file")
    generator, meta = load_generator(model_path)
    meta_file = meta_path_for(generator_file(model_path))
    check_prediction_meta(meta, meta_file)
    if meta.get("lr_stats"):
        try:
            IntensityStats.from_dict(meta["lr_stats"])
        except (TypeError, ValueError, AttributeError) as exc:
            raise InputError(meta_file, f"model metadata lr_stats is unusable ({exc})") from None
    base = make_output_dir(base_dir)
    existing = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()]
    version = (max(existing, default=0) + 1) if version is None else int(version)
    target = base / str(version)
    if target.exists():
        raise InputError(target, "this model version already exists; choose another --version")
    names = [n for n in SIGNATURES if n != "mc_scanner" or meta.get("lr_stats")]
    full_meta = {**meta, "default_samples": int(samples), "max_samples": MAX_SAMPLES, "max_pixels": int(max_pixels),
                 "signatures": names, "tensorflow_version": tf.__version__,
                 "generator_class": type(generator).__name__,
                 "generator_config": _json_config(generator.get_config())}
    module = _ServingModule(generator, full_meta, samples, max_pixels, memory_budget_mb)
    functions = {"serving_default": module.serve, "mc_seeded": module.serve_seeded,
                 "mc_scanner": getattr(module, "serve_scanner", None), "metadata": module.serve_metadata}
    signatures = {name: functions[name].get_concrete_function() for name in names}  # each traced once
    with atomic_directory(target) as tmp:
        tf.saved_model.save(module, os.fspath(tmp), signatures=signatures)
        (tmp / "assets.extra").mkdir()
        (tmp / "assets.extra" / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
    return target


def _json_config(config: dict[str, Any]) -> dict[str, Any]:
    """The generator's Keras config as plain JSON (its constructor arguments)."""
    return json.loads(json.dumps(config, default=str))


def scanner_note(version_dir: str | os.PathLike) -> str | None:
    """One line when the export at ``version_dir`` lacks ``mc_scanner`` (its model stores no LR statistics)."""
    meta = read_meta(Path(version_dir) / "assets.extra" / META_FILE)
    if "mc_scanner" in meta.get("signatures", ()):
        return None
    if meta.get("method", "cyclegan") != "cyclegan":  # a supervised baseline reads no LR scans in training
        return (f"exported without the mc_scanner signature: a {meta['method']} baseline stores no LR statistics; "
                "its clients send slices already normalised, as the serving README shows")
    return ("exported without the mc_scanner signature: the model's metadata has no lr_stats (trained before "
            "they were recorded); retrain it to serve slices in scanner units")


class SavedModelGenerator:
    """A loaded SavedModel export behind the generator interface the Monte Carlo engine uses."""

    def __init__(self, loaded, deterministic: bool = False):
        self._loaded = loaded
        self.deterministic = deterministic  # a model without dropout: the engine makes one pass

    def deterministic_prefix(self, x):
        return tuple(self._loaded.prefix(tf.convert_to_tensor(x, tf.float32)))

    def stochastic_suffix(self, features, seed=None):
        features = tuple(features)
        if seed is None:
            n = tf.shape(features[0])[0]
            seed = tf.random.uniform(tf.stack([n, 2]), 0, MAX_SEED, dtype=tf.int32)
        return self._loaded.suffix(features, seed)

    def __call__(self, x, seed=None):
        return self.stochastic_suffix(self.deterministic_prefix(x), seed)


def find_version_dir(path: str | os.PathLike) -> Path | None:
    """The SavedModel directory at ``path``: itself, or its highest numeric version; None if neither."""
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    if path.is_dir():
        versions = sorted((int(p.name), p) for p in path.iterdir()
                          if p.name.isdigit() and (p / "saved_model.pb").is_file())
        if versions:
            return versions[-1][1]
    return None


def load_model(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Load what ``--model`` names: a training run directory, a ``.keras`` file or an exported SavedModel."""
    version_dir = find_version_dir(path)
    if version_dir is None:
        generator, meta = load_generator(path)
        check_prediction_meta(meta, meta_path_for(generator_file(path)))
        return generator, meta
    meta_file = version_dir / "assets.extra" / META_FILE
    meta = read_meta(meta_file, missing="missing: not a microsr-tf export (no model metadata)")
    check_prediction_meta(meta, meta_file)
    try:
        loaded = tf.saved_model.load(os.fspath(version_dir))
    except Exception as exc:  # a corrupt SavedModel surfaces as several TF error types
        raise InputError(version_dir, f"cannot load SavedModel ({str(exc).splitlines()[0][:200]})") from None
    if not hasattr(loaded, "prefix") or not hasattr(loaded, "suffix"):
        raise InputError(version_dir, "SavedModel has no prefix/suffix functions: not a microsr-tf export")
    if "generator_config" in meta and hasattr(loaded, "generator_weights"):
        return _rebuilt_generator(loaded, meta, version_dir), meta
    return SavedModelGenerator(loaded, deterministic=meta.get("deterministic") is True), meta  # exports made before the config was stored


def _rebuilt_generator(loaded, meta: dict[str, Any], version_dir: Path):
    """The Keras generator with the export's weights: local prediction then runs its fused XLA kernels
    (the exported graphs trace them as plain ops for the stock server, several times slower on CPU)."""
    classes = {cls.__name__: cls for cls in GENERATOR_CLASSES}
    name = meta.get("generator_class", ResnetGenerator.__name__)
    if name not in classes:
        raise InputError(version_dir, f"the export holds a {name!r} generator, which this version cannot rebuild")
    try:
        generator = classes[name].from_config(meta["generator_config"])
        generator.build((None, None, None, 1))
        generator.set_weights([v.numpy() for v in loaded.generator_weights])
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(version_dir, f"cannot rebuild the generator from the export ({str(exc).splitlines()[0]})"
                         ) from None
    return generator
