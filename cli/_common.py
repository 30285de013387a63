"""Shared CLI plumbing: turn user mistakes into one-line errors with a non-zero exit."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import click

from microsr_tf.errors import MicrosrError

F = TypeVar("F", bound=Callable)


def user_errors(func: F) -> F:
    """Report :class:`MicrosrError` as ``Error: <one line>`` and exit 2, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MicrosrError as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except KeyboardInterrupt:
            raise click.Abort() from None

    return wrapper  # type: ignore[return-value]
