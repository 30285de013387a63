"""Test setup: quiet TensorFlow, two logical CPU devices for MirroredStrategy tests, shared fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def pytest_configure(config):
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    except RuntimeError:  # already initialised by a plugin; mirrored tests then skip themselves
        pass


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(1234)
