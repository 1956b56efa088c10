"""Atomic file output: write to a temporary sibling, then rename, so no partial file is ever left.

The few steps that create, commit or remove a temporary sibling run with stop signals deferred
(:func:`interrupts_deferred`): a SIGINT / SIGTERM turned into an exception by :func:`raise_or_defer`
(the CLI's handlers do that) is raised once the step is done, never in the middle of it, so that an
interrupted run leaves neither a temporary sibling nor a half-swapped output behind.

Concurrent writers of the same target each write their own temporary sibling; every commit is a
rename, so the target always holds one complete result (the last committed one).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType


class _Deferral:
    """Main-thread state of :func:`interrupts_deferred` (signal handlers only ever run in the main thread)."""

    depth = 0
    pending: BaseException | None = None


class _Deferred(contextlib.AbstractContextManager[None]):
    """See :func:`interrupts_deferred`."""

    def __init__(self) -> None:
        self._active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> None:
        if self._active:
            _Deferral.depth += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._active:
            return
        _Deferral.depth -= 1
        if _Deferral.depth == 0 and _Deferral.pending is not None:
            pending, _Deferral.pending = _Deferral.pending, None
            raise pending


def interrupts_deferred() -> contextlib.AbstractContextManager[None]:
    """A block that a stop raised through :func:`raise_or_defer` does not cut short: the stop is raised at its end.

    Nests; a no-op outside the main thread. Keep such blocks short (a rename, a ``mkdtemp``, a cleanup).
    """
    return _Deferred()


def raise_or_defer(exc: BaseException) -> None:
    """Raise ``exc`` (from a signal handler) now, or at the end of the current :func:`interrupts_deferred` block."""
    if _Deferral.depth > 0:
        if _Deferral.pending is None:  # the first stop wins; a second one while deferred adds nothing
            _Deferral.pending = exc
        return
    raise exc


def _remove(path: Path) -> None:
    """Remove a file or directory tree if it is there (best effort)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``.

    On any exception (an interrupt included) the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        with interrupts_deferred():
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmp = Path(tmp_name)
        yield tmp
        with interrupts_deferred():
            os.replace(tmp, target)
    finally:
        if tmp is not None:
            with interrupts_deferred():
                _remove(tmp)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``target``; on success it replaces ``target``.

    An existing ``target`` is replaced only once the new content is complete. On any exception (an
    interrupt included) the temporary directory is removed and ``target`` is left as it was. When
    several processes write the same ``target`` at once, each succeeds and ``target`` ends up holding
    exactly one of the results, complete (the last one committed).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        with interrupts_deferred():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        yield tmp
        with interrupts_deferred():
            _commit_dir(tmp, target)
    finally:
        if tmp is not None:
            with interrupts_deferred():
                _remove(tmp)


_COMMIT_TRIES = 100


def _commit_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target``, moving an existing ``target`` aside first and deleting it after.

    A directory cannot be renamed onto a non-empty one: when another writer commits between our
    move-aside and our rename, the rename fails with ENOTEMPTY / EEXIST and is retried.
    """
    for _ in range(_COMMIT_TRIES):
        old: Path | None = None
        if os.path.lexists(target):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            old.rmdir()
            try:
                os.replace(target, old)
            except FileNotFoundError:  # another writer moved it aside first
                old = None
        try:
            os.replace(tmp, target)
        except OSError as exc:
            retry = exc.errno in (errno.ENOTEMPTY, errno.EEXIST)  # another writer's result landed in between
            if old is not None and not retry:
                with contextlib.suppress(OSError):  # put the previous result back
                    os.replace(old, target)
                    old = None
            if old is not None:
                _remove(old)
            if retry:
                continue
            raise
        if old is not None:
            _remove(old)
        return
    raise OSError(errno.EEXIST, "other writers kept replacing the output directory", str(target))
