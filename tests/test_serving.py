"""The client against a PredictionService and REST API on loopback serving an export: results against the
local Monte Carlo engine, bad requests, load, retries, and a server that goes away mid-volume."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from microsr_tf.cli.main import cli
from microsr_tf.errors import InputError
from microsr_tf.export import export_saved_model
from microsr_tf.inference.mc import MonteCarloPredictor
from microsr_tf.serving import ServingClient, ServingError, messages
from serving_fixture import LoopbackServer, save_tiny_generator  # tests/serving_fixture.py

PROTOCOLS = ("grpc", "rest")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    gen = save_tiny_generator(tmp / "g.keras")
    export_saved_model(tmp / "g.keras", tmp / "models" / "microsr", samples=4)
    return gen, tmp / "models" / "microsr"


@pytest.fixture(scope="module")
def server(model):
    with LoopbackServer(model[1]) as srv:
        yield srv


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_seeded_request_matches_local_monte_carlo(model, server, protocol):
    gen, _ = model
    x = np.random.default_rng(0).random((2, 32, 36, 1), dtype=np.float32)
    with ServingClient(server.target(protocol), protocol=protocol) as client:
        mean, var = client.predict(x, samples=5, seed=7)
        again, _ = client.predict(x, samples=5, seed=7)
        tiles, _ = client.predict(x, samples=5, seed=[7, 123])  # one seed per image, as merged requests carry
    ref = MonteCarloPredictor(gen, samples=5).predict(x, seed=7)
    np.testing.assert_allclose(mean, ref.mean, atol=1e-5)
    np.testing.assert_allclose(var, ref.var, atol=1e-6)
    np.testing.assert_array_equal(mean, again)
    per_image = MonteCarloPredictor(gen, samples=5).predict(x, seed=[7, 123])
    np.testing.assert_allclose(tiles, per_image.mean, atol=1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_default_signature_and_single_slice(server, protocol):
    with ServingClient(server.target(protocol), protocol=protocol) as client:
        mean, var = client.predict(np.random.default_rng(8).random((32, 32), dtype=np.float32))
        meta = client.metadata()
    assert mean.shape == var.shape == (32, 32)
    assert np.all(var >= 0) and np.all((mean >= 0) & (mean <= 1)) and var.max() > 0
    assert meta["default_samples"] == 4 and meta["hr_spacing"] == [0.1, 0.1]


def _bad_requests(protocol):
    """(request, what the one-line refusal must say) for every kind of bad input."""
    x = np.random.default_rng(1).random((1, 16, 16, 1), dtype=np.float32)

    def req(**change):
        r = messages.hr_grid_request(x, 3, 1)
        inputs = {**r.inputs, **change}
        return messages.Request(r.signature, {k: v for k, v in inputs.items() if v is not None}, r.outputs)

    bad = [
        (req(samples=np.int32(1)), r"samples must be in \[2, 1000\]"),
        (req(samples=np.int32(1001)), r"samples must be in \[2, 1000\]"),
        (req(samples=np.asarray([3, 3], np.int32)), r"samples must be an int32 count: a scalar, or one per image"),
        (req(image=x[0, :, :, 0]), r"image must be float32 \[B, H, W, 1\], got shape \[16 16\]"),
        (req(image=np.zeros((1, 16, 16, 2), np.float32)), r"\(one channel\)"),
        (req(image=np.zeros((1, 18, 16, 1), np.float32)), r"height and width must be multiples of 4"),
        (req(image=np.zeros((1, 4, 4, 1), np.float32)), r"height and width must be at least 8"),
        (req(image=np.full((1, 16, 16, 1), np.nan, np.float32)), r"image contains NaN or Inf"),
        (req(seed=np.int32(-3)), r"seed must be in \[0, 2147483647\]"),
        (req(seed=None), r"Missing but required: \{seed\}"),
        (req(extra=np.int32(0)), r"Sent extra: \{extra\}"),
        (messages.Request("no_such_signature", {"image": x}, ("mean",)), r"no_such_signature"),
    ]
    if protocol == "grpc":  # REST has no dtypes: JSON numbers are converted to the signature's
        bad.append((req(image=x.astype(np.float64)), r"to be float32 but float64"))
    return bad


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_are_refused_with_what_was_expected_and_the_server_keeps_serving(server, protocol):
    x = np.random.default_rng(1).random((1, 16, 16, 1), dtype=np.float32)
    with ServingClient(server.target(protocol), protocol=protocol) as client:
        for request, expected in _bad_requests(protocol):
            with pytest.raises(ServingError, match=expected) as info:
                client.run(request)
            assert str(info.value).startswith(f"server {server.target(protocol)} ") and "\n" not in str(info.value)
        mean, _ = client.predict(x, samples=3, seed=1)  # still serving
    assert np.isfinite(mean).all()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_model_is_named(server, protocol):
    with ServingClient(server.target(protocol), model_name="other", protocol=protocol) as client:
        with pytest.raises(ServingError, match="other.*--model-name"):
            client.predict(np.zeros((1, 8, 8, 1), np.float32))
    with ServingClient(server.target(protocol), protocol=protocol, version=99) as client:
        with pytest.raises(ServingError, match="99.*--model-version"):
            client.predict(np.zeros((1, 8, 8, 1), np.float32))


def test_the_client_refuses_what_the_server_would_refuse_before_sending(server):
    with ServingClient(server.grpc_target, max_message_mb=0.01) as client:
        with pytest.raises(InputError, match="multiples of 4"):
            client.predict(np.zeros((1, 30, 32, 1), np.float32))
        with pytest.raises(InputError, match="give both samples and seed"):
            client.predict(np.zeros((1, 32, 32, 1), np.float32), samples=3)
        with pytest.raises(ServingError, match="over the 0.01 MB limit.*--max-message-mb"):
            client.predict(np.zeros((1, 64, 64, 1), np.float32), samples=3, seed=0)


def test_messages_over_grpc_default_limit_pass_both_ways(model, server):
    """A 1024 x 1024 slice: a 4 MB request and an 8 MB answer, over gRPC's 4 MB default in each direction."""
    x = np.random.default_rng(2).random((1, 1024, 1024, 1), dtype=np.float32)
    with ServingClient(server.grpc_target) as client:
        mean, var = client.predict(x, samples=2, seed=3)
    assert mean.shape == var.shape == x.shape and np.isfinite(var).all()


def test_200_concurrent_requests_from_16_threads_complete_without_errors(model, server):
    gen, _ = model
    rng = np.random.default_rng(3)
    images = rng.random((4, 1, 16, 16, 1), dtype=np.float32)
    expected = [MonteCarloPredictor(gen, samples=2).predict(images[i], seed=i).mean for i in range(4)]
    clients = {p: ServingClient(server.target(p), protocol=p) for p in PROTOCOLS}

    def one(i):
        mean, var = clients[PROTOCOLS[i % 2]].predict(images[i % 4], samples=2, seed=i % 4)
        return i, mean

    before = server.calls
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(200)))  # an error in any request raises here
    for client in clients.values():
        client.close()
    assert server.calls - before == 200
    for i, mean in results:
        np.testing.assert_allclose(mean, expected[i % 4], atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unavailable_is_retried_with_backoff_until_the_server_is_up(model, protocol):
    port = _free_port()
    started = []

    def start_later():
        time.sleep(0.5)
        kwargs = {"grpc_port": port} if protocol == "grpc" else {"rest_port": port}
        started.append(LoopbackServer(model[1], **kwargs).start())

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        with ServingClient(f"127.0.0.1:{port}", protocol=protocol, retries=6, backoff=0.25) as client:
            mean, _ = client.predict(np.full((1, 16, 16, 1), 0.5, np.float32), samples=2, seed=0)
        assert mean.shape == (1, 16, 16, 1)
    finally:
        thread.join()
        for srv in started:
            srv.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_server_fails_after_the_retries_in_one_line(protocol):
    t0 = time.monotonic()
    with ServingClient(f"127.0.0.1:{_free_port()}", protocol=protocol, retries=2, backoff=0.2) as client:
        with pytest.raises(ServingError) as info:
            client.predict(np.zeros((1, 8, 8, 1), np.float32), samples=2, seed=0)
    assert time.monotonic() - t0 >= 0.6  # waited 0.2 + 0.4 s between the three attempts
    assert "is unavailable" in str(info.value) and "3 attempt(s)" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_that_goes_away_mid_volume_gives_one_line_and_no_outputs(tmp_path, model, protocol):
    lr = np.random.default_rng(4).normal(50, 10, (6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(lr, np.diag([0.4, 0.4, 1.0, 1.0])), tmp_path / "scan.nii.gz")
    with LoopbackServer(model[1], stop_after=3) as srv:  # metadata + two slices, then gone
        result = CliRunner().invoke(cli, ["predict", str(tmp_path / "scan.nii.gz"), "--server", srv.target(protocol),
                                          "--protocol", protocol, "--out-dir", str(tmp_path / "out"),
                                          "--samples", "2", "--seed", "0", "--std", "--retries", "1"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"server {srv.target(protocol)}" in errors[0] and "unavailable" in errors[0]
    assert not list((tmp_path / "out").glob("scan_*"))  # nothing at any final path


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_slow_server_ends_the_call_at_the_timeout_in_one_line(model, protocol):
    with LoopbackServer(model[1], delay=3.0) as srv:
        t0 = time.monotonic()
        with ServingClient(srv.target(protocol), protocol=protocol, timeout=0.5) as client:
            with pytest.raises(ServingError, match=r"gave no answer within 0.5 s \(--timeout\)"):
                client.predict(np.zeros((1, 8, 8, 1), np.float32), samples=2, seed=0)
        assert time.monotonic() - t0 < 2.5  # not retried
