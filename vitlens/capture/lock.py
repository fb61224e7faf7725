"""One writer per store: an OS file lock that dies with its process.

``fcntl.flock`` on ``<store>/vitlens.lock`` is held for as long as a streaming
capture writes the store. The kernel releases it when the writer exits — even on
SIGKILL — so a lock left by a dead process never blocks anyone; the pid written
in the file is only there to name the live writer in the error message.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..errors import StoreLockedError

LOCK = "vitlens.lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return f" ({text})" if text else ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(store: Path) -> IO[str]:
    """Take the write lock of ``store`` (a directory) or raise :class:`StoreLockedError`."""
    path = store / LOCK
    handle = open(path, "a+")  # noqa: SIM115 - held until release()
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: pid file, stale if its pid is gone
        handle.seek(0)
        text = handle.read().split()
        if text and text[0].isdigit() and int(text[0]) != os.getpid() and _pid_alive(int(text[0])):
            handle.close()
            raise StoreLockedError(_message(store, path)) from None
    else:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = _message(store, path)
            handle.close()
            raise StoreLockedError(message) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} pid on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _message(store: Path, path: Path) -> str:
    return (
        f"{str(store)!r} is being written by another process{_holder(path)}; two writers would corrupt it. "
        "Wait for that run to finish (or stop it), then resume with resume=True — a lock left by a process "
        "that died is released automatically."
    )


def release(handle: IO[str]) -> None:
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    handle.close()


@contextlib.contextmanager
def locked(store: Path) -> Iterator[None]:
    handle = acquire(store)
    try:
        yield
    finally:
        release(handle)


def check_unlocked(store: Path) -> None:
    """Raise :class:`StoreLockedError` if a live process holds ``store``'s lock."""
    if (store / LOCK).is_file():
        release(acquire(store))
