"""Helpers for tests that kill a real CLI subprocess mid-run."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Callable


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, waiting_for: str,
                 settle: float = 0.0) -> None:
    """Once ``ready()`` holds (and ``settle`` more seconds pass), SIGKILL ``proc`` and reap it.

    Fails if the process exits first or ``ready()`` does not hold within ``timeout`` seconds;
    ``proc`` must have been started with ``stderr=subprocess.PIPE`` (shown when it exits early).
    """
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, f"no {waiting_for} within {timeout} s"
            time.sleep(0.05)
        time.sleep(settle)
        assert proc.poll() is None, f"the process finished before it could be killed after {waiting_for}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
