"""Outputs written through temporary files get ordinary permissions, not mkstemp's owner-only ones, and a
write the disk refuses names its output and leaves the earlier file as it was."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

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


def test_a_write_the_disk_refuses_names_the_output_and_keeps_the_earlier_file(tmp_path):
    """A file-size limit fails writes past 1 kB as a full disk does (EFBIG; Python ignores SIGXFSZ)."""
    target = tmp_path / "report.md"
    target.write_text("earlier")
    script = ("import resource, sys\n"
              "from microsr_tf.errors import InputError\n"
              "from microsr_tf.files import atomic_write_text\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
              "try:\n"
              "    atomic_write_text(sys.argv[1], 'x' * 5000)\n"
              "except InputError as exc:\n"
              "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == f"{target}: cannot write (File too large); it was left as it was", proc.stderr
    assert target.read_text() == "earlier" and os.listdir(tmp_path) == ["report.md"]
