"""Save and load a trained generator as a Keras archive with its metadata as JSON beside it.

``run/generator.keras`` holds the architecture and weights; ``run/generator.meta.json`` holds what
the training stage knows about the data (spacings, intensity statistics, config) as an opaque dict.
Exported SavedModel directories are not handled here: :mod:`microsr_tf.inference` loads those.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from typing import Any

import keras

from microsr_tf.errors import InputError
from microsr_tf.files import atomic_file
from microsr_tf.models.generator import ResnetGenerator
from microsr_tf.models.srgan import SRResNetGenerator
from microsr_tf.models.unet import UNetGenerator
from microsr_tf.preprocessing import IntensityStats

GENERATOR_FILE = "generator.keras"
# What a generator archive may hold: the CycleGAN's G_L and the supervised baselines' generators.
GENERATOR_CLASSES = (ResnetGenerator, UNetGenerator, SRResNetGenerator)
Generator = ResnetGenerator | UNetGenerator | SRResNetGenerator


def meta_path_for(path: str | os.PathLike) -> str:
    """``x.keras`` -> ``x.meta.json``."""
    path = os.fspath(path)
    return path[: -len(".keras")] + ".meta.json"


def save_generator(generator: Generator, path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write ``generator`` to ``path`` (``*.keras``) and ``meta`` to ``*.meta.json``; both are written in
    full before either is renamed into place."""
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise InputError(path, "a generator file name must end in .keras")
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_file(path, suffix=".keras") as model_tmp, atomic_file(meta_path_for(path)) as meta_tmp:
        generator.save(model_tmp, overwrite=True)
        meta_tmp.write_text(text, encoding="utf-8")


def read_meta(path: str | os.PathLike,
              missing: str = "generator metadata file is missing (it is written beside the .keras file)"
              ) -> dict[str, Any]:
    """The JSON object at ``path``; InputError (``missing`` when absent) for anything else."""
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise InputError(path, missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"generator metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise InputError(path, f"generator metadata must be a JSON object, got {type(meta).__name__}")
    return meta


def check_prediction_meta(meta: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse metadata that prediction cannot use: missing keys, spacings or factors that are not two
    positive numbers, an axis outside 0..2 / -3..-1, or incomplete intensity statistics.

    ``path`` is the metadata file named in the InputError.
    """
    missing = [key for key in ("hr_spacing", "factors", "hr_stats") if key not in meta]
    if missing:
        raise InputError(path, f"model metadata lacks {', '.join(missing)} (not a generator written by training?)")
    for key in ("hr_spacing", "factors"):
        value = meta[key]
        if not (isinstance(value, list) and len(value) == 2 and all(_positive_number(v) for v in value)):
            raise InputError(path, f"model metadata {key} must be two positive numbers, got {value!r}")
    axis = meta.get("axis", -1)
    if isinstance(axis, bool) or not isinstance(axis, int) or not -3 <= axis <= 2:
        raise InputError(path, f"model metadata axis must be an integer in [-3, 2], got {axis!r}")
    if not isinstance(meta["hr_stats"], dict):
        raise InputError(path, f"model metadata hr_stats must be an object, got {meta['hr_stats']!r}")
    try:
        IntensityStats.from_dict(meta["hr_stats"])
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"model metadata hr_stats is unusable ({exc})") from None


def _positive_number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value > 0)


def generator_file(path: str | os.PathLike) -> str:
    """The ``.keras`` file that ``path`` (a ``.keras`` file or a training run directory) names."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "no such file or directory")
    model_path = path
    if os.path.isdir(path):
        model_path = os.path.join(path, GENERATOR_FILE)
        if not os.path.isfile(model_path):
            if os.path.isfile(os.path.join(path, "saved_model.pb")):
                raise InputError(path, "is a SavedModel export; load it with microsr_tf.inference, "
                                       "not as a Keras generator")
            if os.path.isdir(os.path.join(path, "checkpoints")):  # a run still training, or stopped mid-way
                best = os.path.join(path, "generator_best.keras")
                hint = f"; {best} holds the best epoch so far" if os.path.isfile(best) else ""
                raise InputError(path, f"this training run has not finished: no {GENERATOR_FILE} yet (resume it "
                                       f"with `microsr-tf train --out {path} --resume`){hint}")
            raise InputError(path, f"no {GENERATOR_FILE} in this directory (expected a training run "
                                   "directory or a .keras file)")
    if not model_path.endswith(".keras") or not zipfile.is_zipfile(model_path):
        raise InputError(model_path, "not a Keras archive (expected a .keras file written by training)")
    return model_path


def load_generator(path: str | os.PathLike) -> tuple[Generator, dict[str, Any]]:
    """Load a generator and its metadata from a ``.keras`` file or a training run directory."""
    model_path = generator_file(path)
    meta = read_meta(meta_path_for(model_path))
    try:
        model = keras.saving.load_model(model_path, compile=False)
    except Exception as exc:  # Keras raises many types for corrupt or foreign archives
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(model_path, f"cannot load the Keras generator ({first})") from None
    if not isinstance(model, GENERATOR_CLASSES):
        names = [cls.__name__ for cls in GENERATOR_CLASSES]
        known = ", ".join(names[:-1]) + " or " + names[-1]
        raise InputError(model_path, f"holds a {type(model).__name__}, not a {known}")
    return model, meta
