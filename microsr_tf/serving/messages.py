"""Requests for the exported signatures, checked before they are sent, and their answers, in the form of
TF-Serving's gRPC ``PredictionService.Predict`` and of its REST predict API
(``POST /v1/models/NAME[/versions/N]:predict`` with ``signature_name`` and columnar ``inputs``).

Every input is sent with a leading batch dimension (``samples`` and ``seed`` one per image, ``spacing``
one row per image), which TF-Serving's request batching needs. The limits mirror the export's
(:data:`microsr_tf.export.MAX_SAMPLES`); the server checks every input again and answers
INVALID_ARGUMENT, so a client in another language gets the same messages.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from ..errors import InputError
from ..export import MAX_SAMPLES, MIN_SIZE
from ..models.dropout import image_seeds

MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class Request:
    """One predict call: the signature, its named inputs, the outputs expected back and their size."""

    signature: str
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...]
    response_bytes: int = 0  # expected size of the answer (0: unknown)
    images: int = field(default=1)

    @property
    def request_bytes(self) -> int:
        return int(sum(np.asarray(v).nbytes for v in self.inputs.values()))


def _images(images, name: str, multiple: int, min_size: int) -> np.ndarray:
    """``[B, H, W, 1]`` float32 from a batch or one ``[H, W]`` slice, finite, H and W multiples of ``multiple``
    and at least ``min_size``."""
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[None, :, :, None]
    if (x.ndim != 4 or x.shape[-1] != 1 or x.shape[0] < 1 or min(x.shape[1:3]) < min_size
            or x.shape[1] % multiple or x.shape[2] % multiple):
        rule = f" with H and W multiples of {multiple}, at least {min_size}" if multiple > 1 else ""
        raise InputError(None, f"{name} must be [B, H, W, 1] (or one [H, W] slice){rule}, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise InputError(None, f"{name} must hold real numbers, got {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise InputError(None, f"{name} contains NaN or Inf values")
    return x


def check_samples(samples) -> np.ndarray:
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or not 2 <= samples <= MAX_SAMPLES:
        raise InputError(None, f"samples must be an integer in [2, {MAX_SAMPLES}], got {samples!r}")
    return np.int32(samples)


def _seeds(seed, n: int) -> np.ndarray:
    """``[n]`` per-image seeds: a base seed becomes ``image_seeds(seed, n)`` (what the server would derive
    from it), so every input has the batch dimension TF-Serving's request batching needs."""
    values = [seed] if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) else list(seed)
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= MAX_SEED for s in values):
        raise InputError(None, f"seed must be an integer in [0, {MAX_SEED}] or one per image, got {seed!r}")
    if isinstance(seed, (int, np.integer)):
        return image_seeds(int(seed), n)
    if len(values) != n:
        raise InputError(None, f"got {len(values)} seeds for {n} images")
    return np.asarray(values, np.int32)


def hr_grid_request(images, samples: int | None = None, seed: int | Sequence[int] | None = None) -> Request:
    """``serving_default`` (neither ``samples`` nor ``seed``) or ``mc_seeded`` on normalised HR-grid slices."""
    x = _images(images, "images", 4, MIN_SIZE)
    inputs = {"image": x}
    if samples is None and seed is None:
        signature = "serving_default"
    elif samples is None or seed is None:
        raise InputError(None, "give both samples and seed, or neither (the server's default count and a fresh seed)")
    else:
        signature = "mc_seeded"
        inputs.update(samples=np.full(len(x), check_samples(samples), np.int32), seed=_seeds(seed, len(x)))
    return Request(signature, inputs, ("mean", "variance"), response_bytes=2 * x.nbytes, images=len(x))


def scanner_request(lr_images, spacing: Sequence[float], samples: int, seed: int | Sequence[int]) -> Request:
    """``mc_scanner`` on LR slices in the scanner's units with their in-plane spacing in mm."""
    x = _images(lr_images, "lr_images", 1, 1)
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (2,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(None, f"spacing must be two positive numbers (mm), got {spacing!r}")
    n = len(x)
    inputs = {"lr_image": x, "spacing": np.tile(sp.astype(np.float32), (n, 1)),
              "samples": np.full(n, check_samples(samples), np.int32), "seed": _seeds(seed, n)}
    return Request("mc_scanner", inputs, ("mean", "variance", "std"), images=len(x))


def metadata_request() -> Request:
    """The ``metadata`` signature: the model's metadata as JSON."""
    return Request("metadata", {"probe": np.zeros([1], np.int32)}, ("json",))


def to_grpc(request: Request, model_name: str, version: int | None = None) -> predict_pb2.PredictRequest:
    proto = predict_pb2.PredictRequest()
    proto.model_spec.name = model_name
    proto.model_spec.signature_name = request.signature
    if version is not None:
        proto.model_spec.version.value = int(version)
    for key, value in request.inputs.items():
        proto.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return proto


def from_grpc(request: Request, response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    missing = [k for k in request.outputs if k not in response.outputs]
    if missing:
        raise ValueError(f"the answer lacks {', '.join(missing)}")
    return {k: tf.make_ndarray(response.outputs[k]) for k in request.outputs}


def rest_path(model_name: str, version: int | None = None) -> str:
    """``/v1/models/NAME[/versions/N]:predict``."""
    return f"/v1/models/{model_name}" + (f"/versions/{int(version)}" if version is not None else "") + ":predict"


def to_rest(request: Request) -> bytes:
    """The JSON body: ``{"signature_name": ..., "inputs": {name: nested lists}}``.

    float32 values are written as the shortest decimal of their float64 value, so they arrive bit for bit.
    """
    body = {"signature_name": request.signature, "inputs": {k: np.asarray(v).tolist() for k, v in request.inputs.items()}}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def from_rest(request: Request, body: bytes) -> dict[str, np.ndarray]:
    """Outputs of a REST answer: ``{"outputs": {name: value}}``, or ``{"outputs": value}`` for one output."""
    outputs = json.loads(body)["outputs"]
    if len(request.outputs) == 1 and not (isinstance(outputs, dict) and request.outputs[0] in outputs):
        outputs = {request.outputs[0]: outputs}
    missing = [k for k in request.outputs if k not in outputs]
    if missing:
        raise ValueError(f"the answer lacks {', '.join(missing)}")
    return {k: np.asarray(outputs[k], dtype=object if k == "json" else np.float32) for k in request.outputs}


def rest_error(body: bytes) -> str:
    """The message of a REST error answer (``{"error": "..."}``), or the start of the body."""
    try:
        return server_message(str(json.loads(body)["error"]))
    except (ValueError, KeyError, TypeError):
        return server_message(body[:300].decode("utf-8", "replace"))


def server_message(text: str) -> str:
    """One line from a server's error text: the failed input check if there is one, else the first line."""
    found = re.search(r"assertion failed: \[(.*)\]", text)  # up to the last bracket of that line
    if found:
        return found.group(1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no message"
