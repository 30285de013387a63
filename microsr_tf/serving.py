"""TF-Serving over gRPC: a client for the exported mean/variance signatures, and a local server.

:class:`ServingClient` talks to any ``tensorflow.serving.PredictionService`` — the official
``tensorflow_model_server`` in production. :class:`LocalPredictionServer` implements the same gRPC
service in-process on top of ``tf.saved_model.load`` for machines without the official binary
(development, tests, CI); it serves the same SavedModel and signatures.
"""

from __future__ import annotations

import os
from concurrent import futures
from typing import Mapping

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from .errors import InputError
from .export import find_version_dir


class ServingClient:
    """Send normalised HR-grid slices to a PredictionService; get the posterior mean and variance back."""

    def __init__(self, target: str, model_name: str = "microsr", timeout: float = 60.0):
        self.model_name = model_name
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 1 << 30),
                                                                ("grpc.max_send_message_length", 1 << 30)])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def predict(self, images: np.ndarray, samples: int | None = None, seed: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """``images`` ``[B, H, W, 1]`` (or one ``[H, W]`` slice) in [0, 1] -> (mean, variance), same shape.

        With ``samples`` and ``seed`` the reproducible ``mc_seeded`` signature is used; otherwise
        ``serving_default`` (the exported sample count, a fresh seed per request).
        """
        x = np.asarray(images, dtype=np.float32)
        single = x.ndim == 2
        if single:
            x = x[None, :, :, None]
        if x.ndim != 4 or x.shape[-1] != 1 or x.shape[1] % 4 or x.shape[2] % 4:
            raise ValueError(f"images must be [B, H, W, 1] with H and W multiples of 4, got {x.shape}")
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.inputs["image"].CopyFrom(tf.make_tensor_proto(x))
        if samples is None and seed is None:
            request.model_spec.signature_name = "serving_default"
        else:
            if samples is None or seed is None:
                raise ValueError("give both samples and seed, or neither")
            request.model_spec.signature_name = "mc_seeded"
            request.inputs["samples"].CopyFrom(tf.make_tensor_proto(np.int32(samples)))
            request.inputs["seed"].CopyFrom(tf.make_tensor_proto(np.int32(seed)))
        response = self._stub.Predict(request, timeout=self.timeout)
        mean = tf.make_ndarray(response.outputs["mean"])
        var = tf.make_ndarray(response.outputs["variance"])
        return (mean[0, :, :, 0], var[0, :, :, 0]) if single else (mean, var)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``Predict`` on a loaded SavedModel's signatures, answering like TF-Serving does."""

    def __init__(self, model_name: str, loaded, version: int):
        self.model_name = model_name
        self.signatures: Mapping = loaded.signatures
        self.version = version

    def Predict(self, request, context):  # noqa: N802 (gRPC method name)
        if request.model_spec.name != self.model_name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request.model_spec.name}")
        name = request.model_spec.signature_name or "serving_default"
        if name not in self.signatures:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Serving signature name: \"{name}\" not found")
        signature = self.signatures[name]
        expected = set(signature.structured_input_signature[1])
        if set(request.inputs) != expected:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"signature {name} takes inputs {sorted(expected)}, got {sorted(request.inputs)}")
        try:
            outputs = signature(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc).splitlines()[0])
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.model_name
        response.model_spec.signature_name = name
        response.model_spec.version.value = self.version
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
        return response


class LocalPredictionServer:
    """A gRPC PredictionService on ``host:port`` serving one exported model (port 0 picks a free one)."""

    def __init__(self, model_path: str | os.PathLike, model_name: str = "microsr", host: str = "127.0.0.1",
                 port: int = 0, workers: int = 2):
        version_dir = find_version_dir(model_path)
        if version_dir is None:
            raise InputError(model_path, "no SavedModel here (expected saved_model.pb or numbered versions)")
        loaded = tf.saved_model.load(os.fspath(version_dir))
        version = int(version_dir.name) if version_dir.name.isdigit() else 1
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                                   options=[("grpc.max_receive_message_length", 1 << 30),
                                            ("grpc.max_send_message_length", 1 << 30)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionServicer(model_name, loaded, version), self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise InputError(None, f"cannot listen on {host}:{port}")
        self.target = f"{host}:{self.port}"

    def start(self) -> "LocalPredictionServer":
        self._server.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace)

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> "LocalPredictionServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
