"""Two local workers train with MultiWorkerMirroredStrategy and the custom loop and end with
identical weights, though each starts from a different seed and reads different data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

WORKER = textwrap.dedent('''
    import hashlib, json, os, sys
    import numpy as np
    import keras
    import tensorflow as tf
    from microsr_tf.config import ModelConfig, TrainConfig
    from microsr_tf.models.cyclegan import build_cyclegan, make_optimizer
    from microsr_tf.training.multiworker import custom_loop
    from microsr_tf.training.strategy import check_batch_size, is_chief, make_strategy

    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = make_strategy("multiworker")
    check_batch_size(4, strategy)
    keras.utils.set_random_seed(100 + task)  # different seeds: only synchronisation can make weights agree
    tc = TrainConfig(batch_size=4, pool_size=2)
    with strategy.scope():
        model = build_cyclegan(ModelConfig(ngf=4, n_blocks=1, ndf=4, n_layers_d=2), tc, 32)
        model.compile(make_optimizer(tc, 3, "g"), make_optimizer(tc, 3, "d"))

    def dataset_fn(ctx):
        rng = np.random.default_rng(ctx.input_pipeline_id)  # each worker reads its own data
        x = rng.random((8, 32, 32, 1), dtype=np.float32)
        y = rng.random((8, 32, 32, 1), dtype=np.float32)
        return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(ctx.get_per_replica_batch_size(4))

    logs = custom_loop(model, strategy, dataset_fn, epochs=2, steps_per_epoch=2)
    digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()
    with open(os.path.join(sys.argv[1], f"worker-{task}.json"), "w") as fh:
        json.dump({"sha256": digest, "step": int(model.optimizer.iterations.numpy()),
                   "replicas": strategy.num_replicas_in_sync, "chief": is_chief(strategy),
                   "g_loss": logs["g_loss"]}, fh)
''')


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_two_workers_end_with_identical_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    try:
        for index in range(2):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
                   "TF_CONFIG": json.dumps(tf_config)}
            procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + 300
        for proc in procs:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, output[-3000:]
    except subprocess.TimeoutExpired:
        pytest.fail("multi-worker training did not finish within 300 s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    results = [json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(2)]
    assert [r["replicas"] for r in results] == [2, 2]
    assert [r["step"] for r in results] == [4, 4]
    assert [r["chief"] for r in results] == [True, False]
    assert results[0]["sha256"] == results[1]["sha256"]
    assert results[0]["g_loss"] == pytest.approx(results[1]["g_loss"])  # logs are reduced over workers
