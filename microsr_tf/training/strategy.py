"""Choosing a tf.distribute strategy, checking the batch against it, and who writes files.

``auto`` mirrors over all visible GPUs when there are several and otherwise uses the default
(single-device) strategy; ``mirrored`` mirrors over all GPUs, or over all logical CPU devices on a
machine without GPUs; ``multiworker`` reads the cluster from the standard ``TF_CONFIG``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import tensorflow as tf

from microsr_tf.errors import ConfigError


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy called ``name`` (``auto``, ``default``, ``mirrored`` or ``multiworker``)."""
    if name == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError("train.strategy 'multiworker' needs the TF_CONFIG environment variable "
                              "describing the cluster")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError:
            raise ConfigError("TF_CONFIG is not valid JSON") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"unknown strategy {name!r}")


def is_multiworker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def check_batch_size(global_batch_size: int, strategy: tf.distribute.Strategy) -> None:
    """The global batch must split evenly over the replicas (each replica takes the same share)."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ConfigError(f"train.batch_size {global_batch_size} is not divisible by the {replicas} replicas "
                          f"of the distribution strategy")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True unless this process is a non-chief worker of a multi-worker cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not is_multiworker(strategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


class WorkerDir:
    """Where this process writes ``path``: the path itself on the chief, a private temporary folder
    elsewhere (non-chief workers still run collective saves but their files are thrown away)."""

    def __init__(self, path: str | os.PathLike, chief: bool):
        self.chief = chief
        self.path = os.fspath(path) if chief else tempfile.mkdtemp(prefix="microsr-worker-")

    def cleanup(self) -> None:
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)
