"""The machine a benchmark ran on, printed with every table (the README quotes it)."""

from __future__ import annotations

import os
import platform


MATRIX_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides oneDNN's fast paths


def describe() -> str:
    """CPU model and its vector/matrix extensions, logical cores, GPUs, Python and TensorFlow versions,
    and the current load. The model name alone ("Intel(R) Xeon(R) Processor") may hide whether the CPU
    has AVX-512 or AMX, which changes the figures several-fold."""
    import tensorflow as tf

    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    features = [f.upper() for f in MATRIX_FEATURES if f in flags]
    if features:
        model += f" ({' '.join(features)})"
    gpus = tf.config.list_physical_devices("GPU")
    return (f"{model}, {os.cpu_count()} logical CPUs, {len(gpus)} GPU(s), Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}, load average {os.getloadavg()[0]:.1f}")
