"""User-facing errors: one line naming the file (or option) and what is wrong."""

from __future__ import annotations

import os


class MicrosrError(Exception):
    """A mistake in the user's input; the CLI prints it as one line and exits non-zero."""


class InputError(MicrosrError):
    """A bad input file or directory: ``InputError(path, problem)`` renders as ``path: problem``."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")


class ConfigError(MicrosrError):
    """A bad configuration value or key."""
