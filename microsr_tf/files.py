"""The one way every stage publishes an output: write a hidden temporary beside the target, then rename.

A rename within a folder is atomic, so a reader (or a rerun after a crash) sees either the old
state or the finished file, never a partial one. Temporaries are named ``.<target name>.<random><suffix>``
so an interrupted run's leftovers are recognisable; they are created with the permissions any new
file gets under the umask (not ``mkstemp``'s owner-only 0600), which the output keeps.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a newly created file (0666) or folder (0777) gets under the umask."""
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~_umask())


def temp_file_beside(target: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create a new hidden file ``.<name>.<random><suffix>`` in ``target``'s folder, open for writing.

    Returns ``(fd, path)``; the caller closes ``fd``. The suffix matters to writers that pick a format
    from the name (Keras needs ``.keras``).
    """
    target = Path(target)
    while True:
        path = target.parent / f".{target.name}.{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def remove_quietly(*paths: str | os.PathLike) -> None:
    """Delete files that may already be gone."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``.

    On any error (or a ``KeyboardInterrupt``) the temporary is removed and ``path`` is left as it was;
    a failed write of the temporary (a full disk) becomes an InputError naming ``path``. Nest two of
    these to publish a pair of files together (e.g. a model and its metadata): both are written before
    either is renamed.
    """
    fd, tmp = temp_file_beside(path, suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        if exc.filename is not None and os.fspath(exc.filename) != os.fspath(tmp):
            raise  # about another file: its own message names it
        raise InputError(path, f"cannot write ({exc.strerror or type(exc).__name__}); it was left as it was") from None
    except BaseException:
        remove_quietly(tmp)
        raise


def replace_together(moves: Iterable[tuple[str | os.PathLike, str | os.PathLike]]) -> None:
    """``os.replace`` each ``(temporary, target)`` with Ctrl-C and SIGTERM held back until the last is done,
    so that an interruption leaves a set of outputs all new or all as they were (never a new mean beside
    an older variance). A held signal takes effect right after, through its usual handler. Only a SIGKILL
    or a power cut during these few renames can split the set. Signals are held only in the main thread
    (the only one Python runs signal handlers in)."""
    caught: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not None:  # None: a handler Python did not install, left alone
                previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        for tmp, target in moves:
            os.replace(tmp, target)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


def check_outside(out: str | os.PathLike, folders: Iterable[str | os.PathLike | None]) -> None:
    """InputError naming ``out`` when it is one of the input ``folders`` or lies inside one.

    An output written into a data folder would be read back as data by the next command on that folder
    (a resumed run, a second ``prepare``), so it is refused before any work.
    """
    target = Path(os.path.realpath(out))
    for folder in folders:
        if folder is None:
            continue
        data = Path(os.path.realpath(folder))
        if target == data or data in target.parents:
            raise InputError(out, f"lies inside the data folder {os.fspath(folder)}; choose an output folder "
                                  "outside the data folders")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` to fill; on success it replaces ``target``.

    An empty folder already at ``target`` is replaced; on any error the temporary folder is removed
    and ``target`` is left as it was.
    """
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        default_mode(tmp)  # mkdtemp makes it owner-only
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
