"""The machine a benchmark ran on, printed with every table (the README quotes it)."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """CPU model, logical cores, GPUs, Python and TensorFlow versions, and the current load."""
    import tensorflow as tf

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return (f"{model}, {os.cpu_count()} logical CPUs, {len(gpus)} GPU(s), Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}, load average {os.getloadavg()[0]:.1f}")
