"""A client for a TF-Serving model server (the official ``tensorflow_model_server`` or anything that speaks
its APIs): gRPC or REST, TLS, an optional bearer token, timeouts and retries.

Secure by default: scans are patient data, so plain text is refused for any host outside this
machine's loopback unless ``insecure=True`` is given; the check runs before any channel or socket
exists. Credentials are read once, sent only to the server, and never written to a message, log or
file. Every failure is one :class:`ServingError` line naming the server.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any, Sequence

import grpc
import numpy as np
from tensorflow_serving.apis import prediction_service_pb2_grpc

from ..errors import ConfigError, InputError, MicrosrError
from . import messages
from .messages import Request

PROTOCOLS = ("grpc", "rest")
DEFAULT_MAX_MESSAGE_MB = 256  # gRPC's own default is 4 MB, below one 1024^2 HR slice and its answer


class ServingError(MicrosrError):
    """The server could not be reached, refused the request or failed it (one line, naming the server)."""


class _Unavailable(Exception):
    """A failure worth retrying: nothing listening, connection lost, server overloaded."""


@dataclass(frozen=True)
class Endpoint:
    """``HOST:PORT`` of a model server (``[::1]:8500`` for IPv6 addresses)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Endpoint":
        host, sep, port = str(text).strip().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
            raise ConfigError(f"--server: expected HOST:PORT (e.g. 127.0.0.1:8500), got {text!r}")
        return cls(host, int(port))

    @property
    def loopback(self) -> bool:
        """Whether the host is this machine's loopback (``localhost``, 127.0.0.0/8, ``::1``); no name is resolved."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InputError(path, f"cannot read the {what} ({exc.strerror or exc})") from None


class ServingClient:
    """Predict calls to model ``model_name`` on ``target`` (``HOST:PORT``) over ``protocol`` "grpc" or "rest".

    ``tls`` encrypts the connection (HTTPS for REST) and checks the server's certificate against
    ``ca_file`` (PEM; default: the system's trusted CAs); ``cert_file`` and ``key_file`` present a
    client certificate to servers that require one. ``token`` is sent as ``authorization: Bearer``
    metadata or header, for gateways in front of the server. Plain text to a host outside loopback
    is refused unless ``insecure``. ``timeout`` bounds each call (seconds); UNAVAILABLE, and CANCELLED
    (which a stopping server sends), are retried ``retries`` times after waiting ``backoff``,
    ``2 * backoff``, ... seconds. gRPC messages may be up to ``max_message_mb`` in both directions
    (raised explicitly from gRPC's 4 MB default).
    """

    def __init__(self, target: str, model_name: str = "microsr", protocol: str = "grpc", version: int | None = None,
                 *, tls: bool = False, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, token: str | None = None, insecure: bool = False,
                 timeout: float = 600.0, retries: int = 4, backoff: float = 0.5,
                 max_message_mb: float = DEFAULT_MAX_MESSAGE_MB):
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if (ca_file or cert_file or key_file) and not tls:
            raise ConfigError("a CA bundle, client certificate or key is only used with TLS: add --tls")
        if bool(cert_file) != bool(key_file):
            raise ConfigError("a client certificate needs its key and a key its certificate (--tls-cert with --tls-key)")
        if not timeout > 0 or not max_message_mb > 0 or retries < 0 or backoff < 0:
            raise ConfigError("timeout and max message size must be positive, retries and backoff not negative")
        if token is not None and (not token.strip() or any(c in token for c in "\r\n")):
            raise ConfigError("the bearer token is empty or spans several lines")
        self.endpoint = Endpoint.parse(target)
        if not tls and not insecure and not self.endpoint.loopback:
            raise ServingError(
                f"{self.endpoint}: refusing to send scans in plain text to a host outside this machine; use --tls "
                "(with --tls-ca if its certificate is not publicly trusted), or --insecure on a network you trust")
        self.model_name, self.protocol, self.version = model_name, protocol, version
        self.tls, self.timeout, self.retries, self.backoff = tls, float(timeout), int(retries), float(backoff)
        self.max_message_bytes = int(max_message_mb * 2**20)
        self._auth = None if token is None else f"Bearer {token.strip()}"
        self._ssl = self._ssl_context(ca_file, cert_file, key_file) if tls else None
        self._client_cert = bool(cert_file)
        self._channel = None
        if protocol == "grpc":
            self._channel = self._grpc_channel(ca_file, cert_file, key_file)
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def __repr__(self) -> str:  # no credential in any representation
        return f"ServingClient({self.describe()!r})"

    def describe(self) -> str:
        """``server HOST:PORT (gRPC, TLS)``: how errors name the server."""
        how = {"grpc": "gRPC", "rest": "REST"}[self.protocol] + (", TLS" if self.tls else "")
        return f"server {self.endpoint} ({how})"

    @staticmethod
    def _ssl_context(ca_file, cert_file, key_file) -> ssl.SSLContext:
        """Check the PEM files up front (both protocols), and the context REST connects with."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file:
            _read(ca_file, "CA bundle")
            try:
                context.load_verify_locations(cafile=os.fspath(ca_file))
            except ssl.SSLError:
                raise InputError(ca_file, "is not a PEM certificate bundle") from None
        if cert_file:
            _read(cert_file, "client certificate")
            _read(key_file, "client key")
            try:
                context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
            except ssl.SSLError:
                raise InputError(cert_file, "client certificate and key are not PEM or do not belong together") from None
        return context

    def _grpc_channel(self, ca_file, cert_file, key_file):
        ms = max(1, int(self.backoff * 1000))
        options = [("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.enable_retries", 0),  # retries are ours, with the backoff documented above
                   ("grpc.initial_reconnect_backoff_ms", ms), ("grpc.min_reconnect_backoff_ms", ms),
                   ("grpc.max_reconnect_backoff_ms", max(ms, 4000))]
        target = str(self.endpoint)
        if not self.tls:
            return grpc.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca_file, "CA bundle") if ca_file else None,
            private_key=_read(key_file, "client key") if key_file else None,
            certificate_chain=_read(cert_file, "client certificate") if cert_file else None)
        return grpc.secure_channel(target, credentials, options=options)

    # -- calls --------------------------------------------------------------------------------------

    def predict(self, images: np.ndarray, samples: int | None = None, seed: int | Sequence[int] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Posterior ``(mean, variance)`` of normalised HR-grid slices ``[B, H, W, 1]`` (or one ``[H, W]``).

        With ``samples`` and ``seed`` the reproducible ``mc_seeded`` signature is used (one base seed,
        or one seed per image); otherwise ``serving_default`` (the exported count, a fresh seed).
        """
        request = messages.hr_grid_request(images, samples, seed)
        out = self.run(request)
        mean, var = out["mean"], out["variance"]
        return (mean[0, :, :, 0], var[0, :, :, 0]) if np.ndim(images) == 2 else (mean, var)

    def predict_scanner(self, lr_images: np.ndarray, spacing: Sequence[float], samples: int,
                        seed: int | Sequence[int]) -> dict[str, np.ndarray]:
        """``mc_scanner``: LR slices in scanner units and their spacing in, ``mean``/``variance``/``std`` in HR units out."""
        return self.run(messages.scanner_request(lr_images, spacing, samples, seed))

    def metadata(self) -> dict[str, Any]:
        """The served model's metadata (spacings, intensity statistics, limits, signatures)."""
        try:
            text = self.run(messages.metadata_request())["json"].reshape(-1)[0]
        except ServingError as exc:
            if "metadata" in str(exc) and ("not found" in str(exc) or "signature" in str(exc)):
                raise ServingError(f"{self.describe()}: model '{self.model_name}' has no metadata signature (exported "
                                   "by an older microsr-tf); re-export it with `microsr-tf export`") from None
            raise
        try:
            meta = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
        except (ValueError, UnicodeDecodeError):
            raise ServingError(f"{self.describe()}: the model's metadata is not JSON") from None
        if not isinstance(meta, dict):
            raise ServingError(f"{self.describe()}: the model's metadata is not a JSON object")
        return meta

    def run(self, request: Request) -> dict[str, np.ndarray]:
        """Send ``request``, retrying while the server is unavailable; its outputs by name."""
        if self.protocol == "grpc" and max(request.request_bytes, request.response_bytes) > self.max_message_bytes:
            need = max(request.request_bytes, request.response_bytes) / 2**20
            raise ServingError(f"{self.describe()}: a request of {request.images} image(s) needs messages of "
                               f"{need:.3g} MB, over the {self.max_message_bytes / 2**20:.3g} MB limit; raise "
                               "--max-message-mb, or predict a smaller region (--roi)")
        started = time.monotonic()
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return self._send_grpc(request) if self.protocol == "grpc" else self._send_rest(request)
            except _Unavailable as exc:
                if attempt == self.retries:
                    hint = self._hung_up_hint if any(w in str(exc).lower() for w in ("closed", "reset")) else ""
                    raise ServingError(f"{self.describe()} is unavailable ({exc}); gave up after {attempt + 1} "
                                       f"attempt(s) over {time.monotonic() - started:.1f} s{hint}") from None
                time.sleep(delay)
                delay = min(2 * delay, 30.0)
        raise AssertionError("unreachable")

    def _send_grpc(self, request: Request) -> dict[str, np.ndarray]:
        proto = messages.to_grpc(request, self.model_name, self.version)
        metadata = None if self._auth is None else (("authorization", self._auth),)
        try:
            response = self._stub.Predict(proto, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise self._grpc_error(exc) from None
        try:
            return messages.from_grpc(request, response)
        except ValueError as exc:
            raise ServingError(f"{self.describe()}: unexpected answer to {request.signature} ({exc})") from None

    def _grpc_error(self, exc: grpc.RpcError) -> Exception:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else None) or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            if "handshake" in details.lower() or "certificate" in details.lower() or "ssl" in details.lower():
                return ServingError(f"{self.describe()}: TLS handshake failed, the server's certificate is not "
                                    "trusted or does not match its name (pass its CA with --tls-ca)")
            return _Unavailable(messages.server_message(details))
        if code == grpc.StatusCode.CANCELLED:  # this client never cancels: the server stopped mid-call
            return _Unavailable("the server cancelled the call, as a server does when it shuts down")
        return self._refusal(code.name, messages.server_message(details))

    def _send_rest(self, request: Request) -> dict[str, np.ndarray]:
        body = messages.to_rest(request)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        if self._auth is not None:
            headers["Authorization"] = self._auth
        host, port = self.endpoint.host, self.endpoint.port
        if self.tls:
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.request("POST", messages.rest_path(self.model_name, self.version), body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except ssl.SSLCertVerificationError:
            raise ServingError(f"{self.describe()}: TLS handshake failed, the server's certificate is not trusted "
                               "or does not match its name (pass its CA with --tls-ca)") from None
        except ssl.SSLError as exc:
            raise ServingError(f"{self.describe()}: TLS handshake failed ({exc.reason or 'SSL error'}){self._cert_hint}"
                               ) from None
        except TimeoutError:
            raise ServingError(f"{self.describe()} gave no answer within {self.timeout:g} s (--timeout)") from None
        except (ConnectionError, http.client.HTTPException) as exc:
            raise _Unavailable(type(exc).__name__ if not str(exc) else str(exc).splitlines()[0]) from None
        finally:
            conn.close()
        if response.status == 503:
            raise _Unavailable(f"HTTP 503: {messages.rest_error(data)}")
        if response.status != 200:
            code = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                    408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED", 504: "DEADLINE_EXCEEDED"}
            raise self._refusal(code.get(response.status, f"HTTP {response.status}"), messages.rest_error(data))
        try:
            return messages.from_rest(request, data)
        except (ValueError, KeyError, TypeError) as exc:
            raise ServingError(f"{self.describe()}: unexpected answer to {request.signature} ({exc})") from None

    @property
    def _cert_hint(self) -> str:
        """What to try when a TLS server hangs up during the handshake and no client certificate was sent."""
        return ("; if the server requires a client certificate, pass --tls-cert and --tls-key"
                if self.tls and not self._client_cert else "")

    @property
    def _hung_up_hint(self) -> str:
        """What to try when the server closed the connection at once: TLS, or a client certificate."""
        return self._cert_hint if self.tls else "; if the server speaks TLS, add --tls"

    def _refusal(self, code: str, message: str) -> ServingError:
        """One line for a failed call that is not worth retrying."""
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):  # the server's text could quote what was sent
            return ServingError(f"{self.describe()} refused the credentials ({code}); check --token-file / --tls-cert")
        if code == "DEADLINE_EXCEEDED":
            return ServingError(f"{self.describe()} gave no answer within {self.timeout:g} s (--timeout)")
        if code == "RESOURCE_EXHAUSTED" and "message" in message.lower():
            return ServingError(f"{self.describe()}: message too large ({message}); raise --max-message-mb and the "
                                "server's limit, or predict a smaller region (--roi)")
        if code == "NOT_FOUND":
            if self.version is not None:
                return ServingError(f"{self.describe()}: {message} (model '{self.model_name}' version {self.version}; "
                                    "see --model-name and --model-version)")
            return ServingError(f"{self.describe()}: {message} (model '{self.model_name}'; see --model-name)")
        if code == "INVALID_ARGUMENT":
            return ServingError(f"{self.describe()} refused the request: {message}")
        return ServingError(f"{self.describe()}: {code}: {message}")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
