"""Export a trained generator as a versioned SavedModel whose signatures return mean and variance.

Layout (what TF-Serving expects under a model's base path)::

    BASE/<version>/saved_model.pb, variables/      the graph and weights
    BASE/<version>/assets.extra/microsr_meta.json   spacings, intensity statistics, model config

Signatures, on normalised slices already on the HR grid (``[B, H, W, 1]`` float32 in [0, 1], H and W
multiples of 4):

- ``serving_default(image)`` -> ``{"mean", "variance"}`` over the exported default number of
  Monte Carlo samples, with a fresh random seed per request;
- ``mc_seeded(image, samples, seed)`` -> the same with an explicit sample count and seed
  (reproducible; image ``b`` of the batch uses dropout seed rows ``[image_seeds(seed, B)[b], t]``,
  the convention of :class:`microsr_tf.inference.mc.MonteCarloPredictor`; image 0 uses ``seed``).

The SavedModel also carries ``prefix`` and ``suffix`` functions, so :func:`load_model` can hand
``microsr-tf predict`` an object with the generator interface and the cached Monte Carlo path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tensorflow as tf

from .errors import InputError
from .files import atomic_directory
from .models.dropout import image_seeds_tf
from .models.artifact import check_prediction_meta, generator_file, load_generator, meta_path_for, read_meta
from .volumes import make_output_dir

META_FILE = "microsr_meta.json"
_SEED_SPEC = tf.TensorSpec([None, 2], tf.int32, name="seed")
_IMAGE_SPEC = tf.TensorSpec([None, None, None, 1], tf.float32, name="image")


class _ServingModule(tf.Module):
    """The generator's prefix/suffix plus in-graph Monte Carlo moments, ready for tf.saved_model.save."""

    def __init__(self, generator, samples: int, chunk: int):
        super().__init__()
        self.generator = generator
        self.default_samples = tf.constant(int(samples), tf.int32)
        # A generator whose state is a variable: every request draws a new seed, whatever global seed
        # the serving process set (an unseeded stateful op can repeat itself across restored calls).
        self.seed_generator = tf.random.Generator.from_non_deterministic_state()
        self.chunk = int(chunk)
        probe = generator.deterministic_prefix(tf.zeros([1, 8, 8, 1]))
        feature_specs = tuple(tf.TensorSpec([None, None, None, f.shape[-1]], f.dtype) for f in probe)
        self.prefix = tf.function(lambda image: tuple(generator.deterministic_prefix(image)),
                                  input_signature=[_IMAGE_SPEC])
        self.suffix = tf.function(lambda features, seed: generator.stochastic_suffix(features, seed),
                                  input_signature=[feature_specs, _SEED_SPEC])

    def _moments(self, image, samples, seed):
        """Mean and population variance over ``samples`` passes, merged chunk by chunk (Chan)."""
        features = tuple(self.generator.deterministic_prefix(image))
        n = tf.shape(image)[0]
        image_seeds = image_seeds_tf(seed, n)
        out_shape = tf.shape(image)
        mean = tf.zeros(out_shape, tf.float64)
        m2 = tf.zeros(out_shape, tf.float64)
        count = tf.constant(0.0, tf.float64)
        start = tf.constant(0, tf.int32)
        while start < samples:
            k = tf.minimum(self.chunk, samples - start)
            ids = tf.range(start, start + k, dtype=tf.int32)
            tiled = tuple(tf.repeat(f, k, axis=0) for f in features)
            rows = tf.stack([tf.repeat(image_seeds, k), tf.tile(ids, [n])], axis=1)
            y = tf.cast(self.generator.stochastic_suffix(tiled, rows), tf.float64)
            y = tf.reshape(y, tf.concat([[n, k], tf.shape(y)[1:]], axis=0))
            kf = tf.cast(k, tf.float64)
            c_mean = tf.reduce_mean(y, axis=1)
            c_m2 = tf.reduce_sum(tf.square(y - c_mean[:, None]), axis=1)
            total = count + kf
            delta = c_mean - mean
            mean = mean + delta * (kf / total)
            m2 = m2 + c_m2 + tf.square(delta) * (count * kf / total)
            count = total
            start += k
        return {"mean": tf.cast(mean, tf.float32), "variance": tf.cast(m2 / count, tf.float32)}

    @tf.function(input_signature=[_IMAGE_SPEC])
    def serve(self, image):
        seed = self.seed_generator.uniform([], 0, 2**31 - 1, dtype=tf.int32)
        return self._moments(image, self.default_samples, seed)

    @tf.function(input_signature=[_IMAGE_SPEC, tf.TensorSpec([], tf.int32, name="samples"),
                                  tf.TensorSpec([], tf.int32, name="seed")])
    def serve_seeded(self, image, samples, seed):
        tf.debugging.assert_greater_equal(samples, 2, message="samples must be >= 2")
        return self._moments(image, samples, seed)


def export_saved_model(model_path: str | os.PathLike, base_dir: str | os.PathLike, version: int | None = None,
                       samples: int = 100, chunk: int = 10) -> Path:
    """Export the generator at ``model_path`` (run dir or ``.keras``) to ``base_dir/<version>``.

    ``version`` defaults to one more than the highest existing version. Written to a temporary
    directory and renamed, so a failed export leaves no partial version behind.
    """
    if samples < 2:
        raise InputError(None, f"samples must be >= 2, got {samples}")
    generator, meta = load_generator(model_path)
    check_prediction_meta(meta, meta_path_for(generator_file(model_path)))
    base = make_output_dir(base_dir)
    existing = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()]
    version = (max(existing, default=0) + 1) if version is None else int(version)
    target = base / str(version)
    if target.exists():
        raise InputError(target, "this model version already exists; choose another --version")
    module = _ServingModule(generator, samples, chunk)
    with atomic_directory(target) as tmp:
        signatures = {"serving_default": module.serve, "mc_seeded": module.serve_seeded}
        tf.saved_model.save(module, os.fspath(tmp), signatures=signatures)
        (tmp / "assets.extra").mkdir()
        full_meta = {**meta, "default_samples": int(samples)}
        (tmp / "assets.extra" / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
    return target


class SavedModelGenerator:
    """A loaded SavedModel export behind the generator interface the Monte Carlo engine uses."""

    def __init__(self, loaded):
        self._loaded = loaded

    def deterministic_prefix(self, x):
        return tuple(self._loaded.prefix(tf.convert_to_tensor(x, tf.float32)))

    def stochastic_suffix(self, features, seed=None):
        features = tuple(features)
        if seed is None:
            n = tf.shape(features[0])[0]
            seed = tf.random.uniform(tf.stack([n, 2]), 0, 2**31 - 1, dtype=tf.int32)
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
    return SavedModelGenerator(loaded), meta
