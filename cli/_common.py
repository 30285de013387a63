"""Shared CLI plumbing: turn user mistakes into one-line errors with the documented exit codes.

Exit codes, the same for every command: 0 success; 2 a usage error (unknown command or option, a
missing required option, an option value of the wrong type or out of range); 1 anything the command
refuses or fails on after reading its options (a missing or malformed input file or config file,
data that do not fit, a file-system error, a diverged run).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys
import tempfile
from typing import Callable, Iterator, TypeVar

import click

from microsr_tf.errors import ConfigError, MicrosrError

F = TypeVar("F", bound=Callable)


_DISK_FULL = re.compile(r"(\S+?)[;:]? (No space left on device|Disk quota exceeded|File too large)")


def user_errors(func: F | None = None, *, tensorflow: bool = True):
    """Report :class:`MicrosrError` as ``Error: <one line>`` and exit 1, without a traceback.

    File-system failures (``OSError``: permission denied, read-only or full disk, a file where a
    folder is expected) are the user's environment, not a bug, so they are reported the same way,
    naming the path; so are TensorFlow running out of memory (``ResourceExhaustedError``) and TensorFlow
    failing to write a checkpoint to a full disk. With ``tensorflow`` (the default;
    ``@user_errors(tensorflow=False)`` for commands that do not use it) TensorFlow is started here, when the command runs -- not for ``--help`` or a
    usage error -- with its native start-up lines hidden.
    """
    if func is None:
        return functools.partial(user_errors, tensorflow=tensorflow)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            if tensorflow:
                with _native_logs_hidden():  # TF's C++ start-up and CUDA probing lines would drown the output
                    import tensorflow as tf

                    tf.config.list_physical_devices()
            return func(*args, **kwargs)
        except MicrosrError as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except OSError as exc:
            raise click.ClickException(os_error_line(exc)) from None
        except Exception as exc:
            # TensorFlow's errors, matched by module and name: no import here. A full disk (or a file-size
            # limit) while writing a checkpoint comes as ResourceExhaustedError (or OutOfRangeError).
            disk = _DISK_FULL.search(str(exc)) if type(exc).__module__.startswith("tensorflow") else None
            if disk:
                where = disk.group(1).split("_temp/")[0]  # a checkpoint is written in CKPT_temp/ first
                raise click.ClickException(f"{where}: cannot write ({disk.group(2)})") from None
            if type(exc).__name__ != "ResourceExhaustedError":
                raise
            raise click.ClickException(
                "out of memory during the computation; give a smaller --memory-budget (in MB) or free memory "
                "for the commands that take one, or smaller inputs") from None
        except KeyboardInterrupt:
            raise click.Abort() from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _native_logs_hidden() -> Iterator[None]:
    """Hide what native code writes to stderr (fd 2) meanwhile; replay it if an error escapes."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def os_error_line(exc: OSError) -> str:
    """``path: reason`` for an OSError (``src -> dst: reason`` for a failed rename), on one line."""
    text = str(exc).strip()
    reason = exc.strerror or (text.splitlines()[0] if text else type(exc).__name__)
    if exc.filename is None:
        return reason
    where = str(os.fsdecode(exc.filename))
    if exc.filename2 is not None:
        where = f"{where} -> {os.fsdecode(exc.filename2)}"
    return f"{where}: {reason}"


@contextlib.contextmanager
def option_values() -> Iterator[None]:
    """Checks of option values inside: a :class:`ConfigError` is a usage error (exit 2), like a value
    click itself refuses."""
    try:
        yield
    except ConfigError as exc:
        raise click.UsageError(str(exc).splitlines()[0], ctx=click.get_current_context(silent=True)) from None


class FiniteFloat(click.FloatRange):
    """A float option that must be a finite number in the range (click's own lets ``nan`` and ``inf``
    through): a usage error, exit 2, like any other out-of-range value."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number

    def _describe_range(self) -> str:
        """No range in the help of an unbounded one (click would print ``[x<=None]``)."""
        return "" if self.min is None and self.max is None else super()._describe_range()


def plural(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
