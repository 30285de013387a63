"""Serving secure by default: TLS with certificates made here by `cryptography`, client certificates, bearer
tokens, plain text refused outside loopback before any socket exists, and no credential in any output."""

from __future__ import annotations

import datetime
import gzip
import http.client
import ipaddress
import socket
from pathlib import Path

import grpc
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from microsr_tf.cli.main import cli
from microsr_tf.export import export_saved_model
from microsr_tf.serving import ServingClient, ServingError
from serving_fixture import LoopbackServer, save_tiny_generator  # tests/serving_fixture.py

PROTOCOLS = ("grpc", "rest")
OUTSIDE = "192.0.2.10:8500"  # TEST-NET-1 (RFC 5737): documentation only; nothing is ever sent there
TOKEN = "tok-3f9a1c7e5b2d48c6a0e1"


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key, issuer_name, issuer_key, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate it signed, and a second,
    unrelated CA. PEM files in a folder; key bytes kept for the servers."""
    tmp = tmp_path_factory.mktemp("pki")
    files = {}

    def write(name: str, data: bytes) -> Path:
        (tmp / name).write_bytes(data)
        files[name] = tmp / name
        return tmp / name

    cas = {}
    for name in ("ca", "other_ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"microsr test {name}", key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                      f"microsr test {name}")]),
                            key, ca=True)
        cas[name] = (key, cert)
        write(f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    ca_key, ca_cert = cas["ca"]
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, ca_cert.subject, ca_key, ca=False, server=server)
        write(f"{name}.key", _pem(key))
        write(f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    return files


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    save_tiny_generator(tmp / "g.keras")
    export_saved_model(tmp / "g.keras", tmp / "models" / "microsr", samples=2)
    lr = np.random.default_rng(7).normal(50.0, 10.0, (5, 6, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(lr, np.diag([0.4, 0.4, 1.0, 1.0])), tmp / "scan.nii.gz")
    return tmp


def _tls(pki) -> tuple[bytes, bytes]:
    return pki["server.key"].read_bytes(), pki["server.pem"].read_bytes()


X = np.full((1, 16, 16, 1), 0.5, np.float32)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_with_a_self_signed_ca_and_a_client_trusting_another_ca_is_refused_cleanly(model, pki, protocol):
    with LoopbackServer(model / "models" / "microsr", tls=_tls(pki)) as server:
        target = server.target(protocol)
        with ServingClient(target, protocol=protocol, tls=True, ca_file=pki["ca.pem"]) as client:
            mean, _ = client.predict(X, samples=2, seed=1)
        assert mean.shape == X.shape
        with ServingClient(target, protocol=protocol, tls=True, ca_file=pki["other_ca.pem"], retries=3) as client:
            with pytest.raises(ServingError) as info:
                client.predict(X, samples=2, seed=1)
        message = str(info.value)
        assert message.startswith(f"server {target} (") and "TLS handshake failed" in message
        assert "\n" not in message and "attempt" not in message  # not retried: another try cannot help
        with ServingClient(target, protocol=protocol, retries=0) as plain:  # and TLS is really on
            with pytest.raises(ServingError, match="if the server speaks TLS, add --tls"):
                plain.predict(X, samples=2, seed=1)
        assert server.calls == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_that_requires_client_certificates(model, pki, protocol):
    with LoopbackServer(model / "models" / "microsr", tls=_tls(pki), client_ca=pki["ca.pem"].read_bytes()) as server:
        target = server.target(protocol)
        with ServingClient(target, protocol=protocol, tls=True, ca_file=pki["ca.pem"], retries=0) as client:
            with pytest.raises(ServingError, match="if the server requires a client certificate, pass --tls-cert"):
                client.predict(X, samples=2, seed=1)
        with ServingClient(target, protocol=protocol, tls=True, ca_file=pki["ca.pem"], cert_file=pki["client.pem"],
                           key_file=pki["client.key"]) as client:
            mean, _ = client.predict(X, samples=2, seed=1)
    assert np.isfinite(mean).all()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_bearer_token_arrives_at_the_server_and_is_required(model, protocol):
    with LoopbackServer(model / "models" / "microsr", token=TOKEN) as server:
        target = server.target(protocol)
        with ServingClient(target, protocol=protocol) as client:
            with pytest.raises(ServingError, match="refused the credentials"):
                client.predict(X, samples=2, seed=1)
        with ServingClient(target, protocol=protocol, token="not-the-token") as client:
            with pytest.raises(ServingError, match="refused the credentials") as info:
                client.predict(X, samples=2, seed=1)
        assert "not-the-token" not in str(info.value)
        with ServingClient(target, protocol=protocol, token=TOKEN) as client:
            client.predict(X, samples=2, seed=1)
            assert TOKEN not in repr(client)
        assert server.seen_tokens[-1] == TOKEN and server.calls == 1


@pytest.fixture
def no_network(monkeypatch):
    """Every way the client could open a channel or a socket raises instead (and is recorded)."""
    opened = []

    def refuse(name):
        def call(*args, **kwargs):
            opened.append((name, args))
            raise AssertionError(f"{name} was called")
        return call

    monkeypatch.setattr(grpc, "insecure_channel", refuse("grpc.insecure_channel"))
    monkeypatch.setattr(grpc, "secure_channel", refuse("grpc.secure_channel"))
    monkeypatch.setattr(socket, "socket", refuse("socket.socket"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(http.client.HTTPConnection, "connect", refuse("HTTPConnection.connect"))
    return opened


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_text_outside_loopback_is_refused_before_any_channel_or_socket(no_network, protocol):
    for target in (OUTSIDE, "scanner-gateway.example.org:8500", "[2001:db8::1]:8500"):
        with pytest.raises(ServingError, match="refusing to send scans in plain text.*--tls.*--insecure"):
            ServingClient(target, protocol=protocol)
    assert no_network == []


def test_the_cli_refuses_plain_text_outside_loopback_in_one_line(model, no_network):
    result = CliRunner().invoke(cli, ["predict", str(model / "scan.nii.gz"), "--server", OUTSIDE,
                                      "--out-dir", str(model / "never")])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {OUTSIDE}: refusing to send scans in plain text")
    assert no_network == [] and not (model / "never").exists()


def test_insecure_allows_it_and_tls_is_never_refused(no_network):
    """With --insecure (or TLS) the channel is created -- here by the patched factory, so nothing is sent."""
    with pytest.raises(AssertionError, match="grpc.insecure_channel"):
        ServingClient(OUTSIDE, insecure=True)
    with pytest.raises(AssertionError, match="grpc.secure_channel"):
        ServingClient(OUTSIDE, tls=True)
    assert [name for name, _ in no_network] == ["grpc.insecure_channel", "grpc.secure_channel"]
    assert no_network[0][1][0] == OUTSIDE
    for target in ("127.0.0.1:8500", "localhost:8500", "[::1]:8500"):  # loopback stays open for development
        ServingClient(target, protocol="rest")


def test_no_credential_in_any_output_of_a_run_that_used_them(tmp_path, model, pki, monkeypatch):
    """A TLS run with a client certificate and a token, then one refused for a wrong token: the token and
    the private keys appear in no printed line and no written file."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    secrets = [TOKEN.encode()]
    for key in ("client.key", "server.key"):
        lines = pki[key].read_text().splitlines()
        secrets += [line.encode() for line in lines if not line.startswith("-----")]
    out = tmp_path / "out"
    with LoopbackServer(model / "models" / "microsr", tls=_tls(pki), client_ca=pki["ca.pem"].read_bytes(),
                        token=TOKEN) as server:
        args = ["predict", str(model / "scan.nii.gz"), "--server", server.grpc_target, "--tls",
                "--tls-ca", str(pki["ca.pem"]), "--tls-cert", str(pki["client.pem"]), "--tls-key",
                str(pki["client.key"]), "--token-file", str(token_file), "--out-dir", str(out),
                "--samples", "2", "--seed", "3", "--std", "--preview"]
        good = CliRunner().invoke(cli, args)
        assert good.exit_code == 0, good.output
        monkeypatch.setenv("MICROSR_SERVING_TOKEN", "wrong-" + TOKEN)
        bad = CliRunner().invoke(cli, [a for a in args if a not in ("--token-file", str(token_file))])
        assert bad.exit_code == 1 and "refused the credentials" in bad.output
    assert server.seen_tokens[0] == TOKEN
    written = [p for p in out.iterdir()]
    assert len(written) == 4  # mean, var, std, preview
    texts = [good.output.encode(), bad.output.encode()]
    texts += [gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes() for p in written]
    for text in texts:
        for secret in secrets:
            assert secret not in text
