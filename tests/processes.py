"""Helpers for tests that kill a real CLI subprocess mid-run."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Callable


def signal_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, waiting_for: str,
                sig: int, settle: float = 0.0) -> int:
    """Once ``ready()`` holds (and ``settle`` more seconds pass), send ``sig`` to ``proc``; its exit code.

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
        assert proc.poll() is None, f"the process finished before it could be signalled after {waiting_for}"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return proc.returncode


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, waiting_for: str,
                 settle: float = 0.0) -> None:
    """:func:`signal_when` with SIGKILL, which no process can catch."""
    assert signal_when(proc, ready, timeout, waiting_for, signal.SIGKILL, settle) == -signal.SIGKILL


def sigkill_after_line(proc: subprocess.Popen, wanted: Callable[[str], bool], timeout: float,
                       settle: float = 0.0) -> list[str]:
    """SIGKILL ``proc`` once a line of its stdout satisfies ``wanted`` (and ``settle`` more seconds pass).

    ``proc`` must have been started with ``stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True``.
    Returns every stdout line it wrote, including those that reached the pipe before it died. Fails
    if it exits first or no such line comes within ``timeout`` seconds.
    """
    import queue
    import threading

    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no wanted output within {timeout} s; got {seen[-3:]}") from None
            assert line is not None, f"exited first ({proc.wait()}): {proc.stderr.read()[-2000:]}"
            seen.append(line)
            if wanted(line):
                break
        time.sleep(settle)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=30)
    while (line := lines.get()) is not None:
        seen.append(line)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return seen
