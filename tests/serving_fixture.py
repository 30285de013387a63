"""A loopback stand-in for ``tensorflow_model_server``: TF-Serving's gRPC PredictionService and REST predict
API on 127.0.0.1, for tests on machines without the official binary. Not a product server.

It runs an export the way the official server does -- the SavedModel loaded into a TF1 session and
its SignatureDefs fed by tensor name through the C++ session, no Python-side shape checks -- and
answers like it: NOT_FOUND for an unknown model, version or signature, INVALID_ARGUMENT for missing
or extra inputs, a dtype other than the signature's, or a failed in-graph check; on REST,
``{"error": ...}`` with the matching HTTP status. Optional TLS (with client certificates), a required
bearer token as a gateway would check it, and ``stop_after`` to vanish mid-volume.
"""

from __future__ import annotations

import json
import re
import ssl
import tempfile
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from microsr_tf.export import find_version_dir

# Metadata of the tiny test generators: LR 0.4 mm -> HR 0.1 mm, LR and HR intensity statistics.
META = {"format": 1, "hr_spacing": [0.1, 0.1], "lr_spacing": [0.4, 0.4], "factors": [4.0, 4.0],
        "hr_stats": {"mean": 100.0, "std": 20.0, "low": -2.0, "high": 3.0},
        "lr_stats": {"mean": 50.0, "std": 10.0, "low": -2.5, "high": 2.5},
        "model": {"ngf": 4, "n_blocks": 1}, "patch_size": 32, "axis": -1}


def save_tiny_generator(path: Path, meta: dict = META, **kwargs):
    """An untrained ``ResnetGenerator(ngf=4, n_blocks=1)`` saved as a training run would save it; returns it."""
    from microsr_tf.models.artifact import save_generator
    from microsr_tf.models.generator import ResnetGenerator

    gen = ResnetGenerator(**{"ngf": 4, "n_blocks": 1, **kwargs})
    gen(tf.zeros([1, 32, 32, 1]))
    save_generator(gen, path, meta)
    return gen


_HTTP = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
         grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
         grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.UNAVAILABLE: 503}


class Status(Exception):
    """A failed call: gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class _Servable:
    """One SavedModel version in a TF1 session, called through ``make_callable`` (the C++ Session path)."""

    def __init__(self, version_dir: Path):
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], str(version_dir))
        self.signatures = {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}
        self._callables: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def input_dtypes(self, name: str) -> dict[str, np.dtype]:
        return {k: tf.dtypes.as_dtype(v.dtype).as_numpy_dtype for k, v in self.signatures[name].inputs.items()}

    def run(self, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sig = self.signatures[name]
        with self._lock:
            if name not in self._callables:
                ins, outs = sorted(sig.inputs), sorted(sig.outputs)
                fn = self.session.make_callable([self.graph.get_tensor_by_name(sig.outputs[k].name) for k in outs],
                                                feed_list=[self.graph.get_tensor_by_name(sig.inputs[k].name)
                                                           for k in ins])
                self._callables[name] = (ins, outs, fn)
        ins, outs, fn = self._callables[name]
        return dict(zip(outs, fn(*[inputs[k] for k in ins])))


class LoopbackServer:
    """Serve the export at ``model_path`` (a version folder or a base path: its highest version) as ``model_name``.

    ``tls=(key_pem, cert_pem)`` serves gRPC and REST over TLS; ``client_ca`` (PEM) then requires a
    client certificate signed by it. ``token`` requires ``authorization: Bearer <token>``; the values
    received are kept in ``seen_tokens``. ``stop_after=n`` answers ``n`` predict calls, then refuses
    every further one with UNAVAILABLE and shuts down, as a server that goes away; ``delay`` makes
    every call that many seconds slower.
    """

    def __init__(self, model_path, model_name: str = "microsr", *, tls: tuple[bytes, bytes] | None = None,
                 client_ca: bytes | None = None, token: str | None = None, stop_after: int | None = None,
                 workers: int = 16, grpc_port: int = 0, rest_port: int = 0, delay: float = 0.0):
        version_dir = find_version_dir(model_path)
        if version_dir is None:
            raise FileNotFoundError(f"no SavedModel under {model_path}")
        self.servable = _Servable(version_dir)
        self.model_name, self.version = model_name, int(version_dir.name) if version_dir.name.isdigit() else 1
        self.token, self.seen_tokens, self.delay = token, [], delay
        self.calls, self._left, self._stopped = 0, stop_after, False
        self._count_lock = threading.Lock()

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                                 options=[("grpc.max_receive_message_length", 1 << 30),
                                          ("grpc.max_send_message_length", 1 << 30)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Servicer(self), self._grpc)
        if tls is None:
            grpc_port = self._grpc.add_insecure_port(f"127.0.0.1:{grpc_port}")
        else:
            creds = grpc.ssl_server_credentials([tls], root_certificates=client_ca, require_client_auth=bool(client_ca))
            grpc_port = self._grpc.add_secure_port(f"127.0.0.1:{grpc_port}", creds)
        self._http = _HTTPServer(("127.0.0.1", rest_port), _handler(self))
        self._http.daemon_threads = True
        if tls is not None:
            self._http.socket = _server_ssl(tls, client_ca).wrap_socket(self._http.socket, server_side=True)
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.rest_target = f"127.0.0.1:{self._http.server_address[1]}"
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def target(self, protocol: str) -> str:
        return self.grpc_target if protocol == "grpc" else self.rest_target

    # -- what both front ends share ------------------------------------------------------------------

    def authorize(self, header: str | None) -> None:
        if self.token is None:
            return
        if header is not None:
            self.seen_tokens.append(header.removeprefix("Bearer "))
        if header != f"Bearer {self.token}":
            raise Status(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def predict(self, model: str, version: int | None, signature: str, inputs: dict[str, np.ndarray]):
        """TF-Serving's checks, then the session (after ``delay`` seconds); outputs by name, or :class:`Status`."""
        time.sleep(self.delay)
        with self._count_lock:
            if self._stopped:
                raise Status(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if model != self.model_name:
            raise Status(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({model})")
        if version is not None and version != self.version:
            raise Status(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({model}, {version})")
        signature = signature or "serving_default"
        if signature not in self.servable.signatures:
            raise Status(grpc.StatusCode.FAILED_PRECONDITION,
                         f"Serving signature key \"{signature}\" not found.")
        expected = self.servable.input_dtypes(signature)
        if set(inputs) != set(expected):
            raise Status(grpc.StatusCode.INVALID_ARGUMENT,
                         f"input size does not match signature: {len(inputs)}!={len(expected)} "
                         f"len({{{','.join(sorted(inputs))}}}) != len({{{','.join(sorted(expected))}}}). "
                         f"Sent extra: {{{','.join(sorted(set(inputs) - set(expected)))}}}. Missing but required: "
                         f"{{{','.join(sorted(set(expected) - set(inputs)))}}}.")
        for i, key in enumerate(sorted(expected)):
            if inputs[key].dtype != expected[key]:
                raise Status(grpc.StatusCode.INVALID_ARGUMENT, f"Expects arg[{i}] to be "
                             f"{tf.dtypes.as_dtype(expected[key]).name} but {inputs[key].dtype} is provided")
        try:
            outputs = self.servable.run(signature, inputs)
        except tf.errors.InvalidArgumentError as exc:
            raise Status(grpc.StatusCode.INVALID_ARGUMENT, exc.message) from None
        except tf.errors.OpError as exc:
            raise Status(grpc.StatusCode.INTERNAL, exc.message) from None
        with self._count_lock:
            self.calls += 1
            if self._left is not None:
                self._left -= 1
                if self._left <= 0 and not self._stopped:
                    self._stopped = True
                    threading.Thread(target=self.stop, daemon=True).start()
        return outputs

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> "LoopbackServer":
        self._grpc.start()
        self._http_thread.start()
        return self

    def stop(self) -> None:
        with self._count_lock:
            self._stopped = True
        self._grpc.stop(grace=None)
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _HTTPServer(ThreadingHTTPServer):
    """A client that hung up (a timeout, a refused TLS handshake) is not an error worth a traceback."""

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)


class _Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server: LoopbackServer):
        self.server = server

    def Predict(self, request, context):  # noqa: N802 (gRPC method name)
        try:
            self.server.authorize(dict(context.invocation_metadata()).get("authorization"))
            version = request.model_spec.version.value if request.model_spec.HasField("version") else None
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            outputs = self.server.predict(request.model_spec.name, version, request.model_spec.signature_name, inputs)
        except Status as status:
            context.abort(status.code, status.message)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.server.model_name
        response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
        response.model_spec.version.value = self.server.version
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


def _handler(server: LoopbackServer):
    path_re = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet, and no request line (or header) in any log
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802 (http.server method name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            match = path_re.match(self.path)
            try:
                if match is None:
                    raise Status(grpc.StatusCode.NOT_FOUND, f"Malformed request: POST {self.path}")
                server.authorize(self.headers.get("Authorization"))
                try:
                    request = json.loads(body)
                except ValueError:
                    raise Status(grpc.StatusCode.INVALID_ARGUMENT, "JSON Parse error: the body is not JSON") from None
                if not isinstance(request, dict) or "inputs" not in request:
                    raise Status(grpc.StatusCode.INVALID_ARGUMENT, "Missing 'inputs' (columnar format) in JSON body")
                signature = request.get("signature_name", "serving_default")
                if signature not in server.servable.signatures:
                    raise Status(grpc.StatusCode.FAILED_PRECONDITION, f"Serving signature key \"{signature}\" not found.")
                dtypes = server.servable.input_dtypes(signature)
                inputs = {}
                for key, value in request["inputs"].items():
                    try:  # REST converts JSON numbers to the signature's dtype
                        inputs[key] = np.asarray(value, dtype=dtypes.get(key, np.float32))
                    except (TypeError, ValueError):
                        raise Status(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}' is not a tensor of "
                                                                       f"{np.dtype(dtypes.get(key, np.float32))}") from None
                outputs = server.predict(match.group(1), int(match.group(2)) if match.group(2) else None,
                                         signature, inputs)
            except Status as status:
                self._reply(_HTTP.get(status.code, 500), {"error": status.message})
                return
            values = {k: _json_value(v) for k, v in outputs.items()}
            self._reply(200, {"outputs": next(iter(values.values())) if len(values) == 1 else values})

    return Handler


def _json_value(value: np.ndarray):
    """Nested lists; strings decoded as UTF-8, as TF-Serving writes DT_STRING outputs."""
    if value.dtype == object:
        return np.vectorize(lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b), otypes=[object])(value).tolist()
    return value.tolist()


def _server_ssl(tls: tuple[bytes, bytes], client_ca: bytes | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        key, cert = Path(tmp) / "key.pem", Path(tmp) / "cert.pem"
        key.write_bytes(tls[0])
        cert.write_bytes(tls[1])
        context.load_cert_chain(cert, key)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca.decode("ascii"))
    return context
