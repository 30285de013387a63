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
    except RuntimeError:  # already initialised by a plugin: see the two_cpus fixture
        pass


def missing_devices(reason: str) -> None:
    """Skip a test that needs the two logical CPUs when they could not be set up -- but fail it in CI
    (the ``CI`` environment variable set, as `.ci/run` and hosted CI services do), where a skip
    would hide that the multi-device code went untested."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}, and CI must run every multi-device test", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def two_cpus() -> list[str]:
    """Names of the two logical CPU devices made in :func:`pytest_configure`."""
    import tensorflow as tf

    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        missing_devices("needs the two logical CPU devices set up in conftest.py")
    return [d.name for d in cpus[:2]]


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(1234)


def _disk_phantom(n: int, spacing: float, seed: int):
    """A bright disk with a denser core and noise over three slices: enough foreground for the ROI
    and the patch filter."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] / n
    r2 = (yy - 0.5) ** 2 + (xx - 0.5) ** 2
    img = np.stack([1000.0 * (r2 < 0.12) + 300.0 * (r2 < 0.03) + rng.normal(0, 20, (n, n)) for _ in range(3)], -1)
    return nib.Nifti1Image(img.astype(np.float32), np.diag([spacing, spacing, 0.5, 1.0]))


@pytest.fixture(scope="session")
def training_folders(tmp_path_factory):
    """Unpaired LR (0.4 mm, 16 px) and HR (0.1 mm, 64 px) folders of two volumes each, for tiny runs."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("training-data")
    lr, hr = root / "lr", root / "hr"
    lr.mkdir()
    hr.mkdir()
    for i in range(2):
        nib.save(_disk_phantom(16, 0.4, i), lr / f"case{i}.nii.gz")
        nib.save(_disk_phantom(64, 0.1, 10 + i), hr / f"case{i}.nii.gz")
    return lr, hr
