"""Outputs written through temporary files get ordinary permissions, not mkstemp's owner-only ones."""

from __future__ import annotations

import os
import stat

import pytest
import tensorflow as tf

from microsr_tf.config import Config
from microsr_tf.export import export_saved_model
from microsr_tf.files import atomic_write_text
from microsr_tf.models.artifact import save_generator
from microsr_tf.models.generator import ResnetGenerator

META = {"format": 1, "hr_spacing": [0.1, 0.1], "lr_spacing": [0.4, 0.4], "factors": [4.0, 4.0],
        "hr_stats": {"mean": 100.0, "std": 20.0, "low": -2.0, "high": 3.0},
        "model": {"ngf": 4, "n_blocks": 1}, "patch_size": 32, "axis": -1}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_text_config_model_and_export_get_umask_permissions(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello" and mode(tmp_path / "a.txt") == 0o644
    Config().save(tmp_path / "config.yaml")
    assert mode(tmp_path / "config.yaml") == 0o644
    gen = ResnetGenerator(ngf=4, n_blocks=1)
    gen(tf.zeros([1, 32, 32, 1]))
    save_generator(gen, tmp_path / "g.keras", META)
    assert mode(tmp_path / "g.keras") == 0o644 and mode(tmp_path / "g.meta.json") == 0o644
    version = export_saved_model(tmp_path / "g.keras", tmp_path / "export", samples=2)
    assert mode(version) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "config.yaml", "export", "g.keras",
                                                           "g.meta.json"]  # no temporary left behind
