"""The gRPC client against a real PredictionService on loopback serving an exported SavedModel."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf

from microsr_tf.export import export_saved_model
from microsr_tf.inference.mc import MonteCarloPredictor
from microsr_tf.models.artifact import save_generator
from microsr_tf.models.generator import ResnetGenerator
from microsr_tf.serving import LocalPredictionServer, ServingClient

META = {"format": 1, "hr_spacing": [0.1, 0.1], "lr_spacing": [0.4, 0.4], "factors": [4.0, 4.0],
        "hr_stats": {"mean": 100.0, "std": 20.0, "low": -2.0, "high": 3.0},
        "model": {"ngf": 4, "n_blocks": 1}, "patch_size": 32, "axis": -1}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    gen = ResnetGenerator(ngf=4, n_blocks=1)
    gen(tf.zeros([1, 32, 32, 1]))
    save_generator(gen, tmp / "g.keras", META)
    export_saved_model(tmp / "g.keras", tmp / "models" / "microsr", samples=4)
    with LocalPredictionServer(tmp / "models" / "microsr", port=0) as server:
        yield gen, server


def test_seeded_request_matches_local_monte_carlo(served):
    gen, server = served
    x = np.random.default_rng(0).random((1, 32, 36, 1), dtype=np.float32)
    with ServingClient(server.target) as client:
        mean, var = client.predict(x, samples=5, seed=7)
        again, _ = client.predict(x, samples=5, seed=7)
    ref = MonteCarloPredictor(gen, samples=5).predict(x, seed=7)
    np.testing.assert_allclose(mean, ref.mean, atol=1e-5)
    np.testing.assert_allclose(var, ref.var, atol=1e-6)
    np.testing.assert_array_equal(mean, again)


def test_default_signature_and_single_slice(served):
    _, server = served
    with ServingClient(server.target) as client:
        mean, var = client.predict(np.full((32, 32), 0.5, np.float32))
    assert mean.shape == var.shape == (32, 32)
    assert np.all(var >= 0) and np.all((mean >= 0) & (mean <= 1))


def test_server_errors_reach_the_client(served):
    _, server = served
    with ServingClient(server.target, model_name="other") as client:
        with pytest.raises(grpc.RpcError) as info:
            client.predict(np.zeros((1, 32, 32, 1), np.float32))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with ServingClient(server.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.predict(np.zeros((1, 32, 32, 1), np.float32), samples=1, seed=0)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ValueError, match="multiples of 4"):
            client.predict(np.zeros((1, 30, 32, 1), np.float32))
