"""Shared CLI plumbing: turn user mistakes into one-line errors with a non-zero exit."""

from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

import click

from microsr_tf.errors import MicrosrError

F = TypeVar("F", bound=Callable)


def user_errors(func: F) -> F:
    """Report :class:`MicrosrError` as ``Error: <one line>`` and exit non-zero, without a traceback.

    File-system failures (``OSError``: permission denied, read-only or full disk, a file where a
    folder is expected) are the user's environment, not a bug, so they are reported the same way,
    naming the path.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MicrosrError as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except OSError as exc:
            raise click.ClickException(os_error_line(exc)) from None
        except KeyboardInterrupt:
            raise click.Abort() from None

    return wrapper  # type: ignore[return-value]


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
