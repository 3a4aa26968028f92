"""One process at a time owns a local data directory.

``run --once`` and ``run`` hold an exclusive ``flock`` on ``<dir>/daemon.lock`` for
their whole pass (or lifetime): creating the passphrase, a root or the Kong
intermediate, saving the journal and publishing are then never done by two processes
at once. The lock file holds the owner's pid, to say who is in the way; the lock is
the kernel's, so it goes away with its process, however that ends.

Read-only commands (``status``, ``verify``, ``config check``) take no lock: they
write nothing, not even the lock file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ca_daemon.errors import ServiceError
from ca_daemon.util.files import ensure_private_dir

LOCK_NAME = "daemon.lock"
_POLL = 0.05


class DataDirBusy(ServiceError):
    """Another process owns the data directory."""


def _owner(fd: int) -> str:
    """The pid the current owner wrote, as text; "unknown" while it is being written."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


@contextmanager
def owning(
    directory: Path,
    *,
    wait: float = 0.0,
    say: Callable[[str], None] = lambda _line: None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[None]:
    """Hold ``directory``'s lock for the ``with`` block.

    Busy: with ``wait`` 0, raise DataDirBusy at once; else ``say`` once who holds it,
    wait up to ``wait`` seconds for it, and raise DataDirBusy if it is still held.
    """
    ensure_private_dir(directory)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if not _try_lock(fd):
            owner = _owner(fd)
            if wait <= 0:
                raise DataDirBusy(f"another ca-daemon (pid {owner}) owns {directory}")
            say(f"waiting for {directory} held by pid {owner} (up to {wait:g}s)")
            deadline = clock() + wait
            while not _try_lock(fd):
                if clock() >= deadline:
                    raise DataDirBusy(
                        f"{directory} is still held by another ca-daemon (pid {_owner(fd)}) "
                        f"after {wait:g}s; giving up"
                    )
                time.sleep(_POLL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
