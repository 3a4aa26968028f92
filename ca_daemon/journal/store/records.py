"""Where the journal's records are kept: a small key → JSON store with check-and-set.

Two implementations: JSON files beside the local anchor (``FileRecordStore``), and
Vault KV v2 (``anchor.vault.VaultKvStore``). The journal sees only this interface.

Keys are ``""`` for the main record and ``"<folder>/<name>"`` below it; a version is
a positive integer per key, 0 meaning "does not exist", and every write names the
version it replaces so two writers can never both win.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from ca_daemon.errors import StoreError
from ca_daemon.util.files import ensure_private_dir, write_atomic

Record = dict[str, Any]

_KEY_PART = re.compile(r"^[a-z0-9][-a-z0-9.]*$")


class RecordConflict(StoreError):
    """The record changed since it was read (check-and-set failed): reload, decide again."""


class RecordInvalid(StoreError):
    """The store answered, and what it holds is not a journal record (truncated, edited)."""


class RecordStore(Protocol):
    description: str

    def read(self, key: str) -> tuple[Record, int] | None:
        """The record and its version; None when there is none."""

    def write(self, key: str, record: Record, version: int) -> int:
        """Replace version ``version`` (0: create) with ``record``; the new version.
        Raises RecordConflict when the stored version is another."""

    def delete(self, key: str) -> None:
        """Remove the record; nothing happens when there is none."""

    def list(self, folder: str) -> list[str]:
        """Names of the records directly in ``folder``."""


def _owner(path: Path) -> str:
    """Who owns ``path`` and how to fix it, for an error about reading it."""
    try:
        st = path.stat()
    except OSError:
        return ""
    mode, me = st.st_mode & 0o7777, os.geteuid()
    found = f"; owned by uid {st.st_uid} (this daemon runs as uid {me}), mode {mode:04o}"
    if st.st_uid != me:
        return f"{found}: give it to this daemon's user (chown {me} {path}; chmod 0600 {path})"
    return f"{found}: make it readable by its owner (chmod 0600 {path})"


# A record file as found: (device, inode, size, mtime and ctime in ns).
_Identity = tuple[int, int, int, int, int]


def _identity(st: os.stat_result) -> _Identity:
    # The ctime too: a file written in place of another within one tick of the clock
    # may get its inode back, but a ctime is set at each change of the inode.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_regular(path: Path) -> tuple[bytes, _Identity]:
    """The file's bytes and identity; AnchorError for a FIFO, device or directory in a
    record's place (O_NONBLOCK: opening a FIFO must not block the pass until someone
    writes to it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path} is not a regular file ({_file_type(st.st_mode)})")
        return handle.read(), _identity(st)


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return f"mode {mode:o}"


def check_key(key: str) -> list[str]:
    parts = key.split("/") if key else []
    if any(not _KEY_PART.match(p) for p in parts):
        raise StoreError(f"invalid record key {key!r}")
    return parts


class FileRecordStore:
    """Records as JSON files (mode 0600) under one directory, one flock for every write.

    The main record is ``<dir>/state.json`` (where version 1 kept everything); the
    others are ``<dir>/state.d/<folder>/<name>.json``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.description = f"state in {directory}"
        # Each record as last read, by its file's identity: a record file that did not
        # move (a write replaces it; an edit moves its mtime) is not read and parsed again
        # (64 shards of 5,000 clients are ~15 MB of JSON, at every pass).
        self._read: dict[Path, tuple[_Identity, Record, int]] = {}

    def path(self, key: str) -> Path:
        parts = check_key(key)
        if not parts:
            return self.directory / "state.json"
        return self.directory.joinpath("state.d", *parts[:-1], f"{parts[-1]}.json")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        ensure_private_dir(self.directory)
        fd = os.open(self.directory / "state.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def read(self, key: str) -> tuple[Record, int] | None:
        path = self.path(key)
        if key:  # the main record is small, and read fresh: requests land there
            try:
                st = os.stat(path)
            except OSError:
                self._read.pop(path, None)  # absent, or unreadable: said below
            else:
                known = self._read.get(path)
                if known is not None and stat.S_ISREG(st.st_mode) and known[0] == _identity(st):
                    return known[1], known[2]
        found = self._read_file(path)
        if found is None:
            return None
        record, version, identity = found
        if key:
            self._read[path] = (identity, record, version)
        return record, version

    def _read_file(self, path: Path) -> tuple[Record, int, _Identity] | None:
        try:
            raw, identity = _read_regular(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{path}: cannot be read ({exc.strerror}){_owner(path)}") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise RecordInvalid(
                f"{path} is not valid JSON ({len(raw)} bytes; truncated?)"
            ) from None
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("state"), dict)
            or not isinstance(doc.get("version"), int)
        ):
            raise RecordInvalid(
                f"{path} is not a journal record (want an object with an integer 'version' "
                f"and a 'state' object; found {type(doc).__name__})"
            )
        return doc["state"], doc["version"], identity

    def write(self, key: str, record: Record, version: int) -> int:
        path = self.path(key)
        with self._locked():
            current = self._read_file(path)  # never from memory: this is the check-and-set
            stored = current[1] if current else 0
            if stored != version:
                raise RecordConflict(f"{path}: version {stored}, expected {version}")
            for parent in reversed(path.relative_to(self.directory).parents[:-1]):
                ensure_private_dir(self.directory / parent)
            new = version + 1
            if version == 0 and not key:
                # A lost state.json must not restart its versions below what was
                # published from it (publishers refuse an older generation).
                new = max(new, self._high_water() + 1)
            doc = {"version": new, "state": record}
            write_atomic(path, json.dumps(doc, indent=1).encode(), mode=0o600)
            if not key:
                write_atomic(self.directory / "state.version", f"{new}\n".encode(), mode=0o600)
        return new

    def _high_water(self) -> int:
        """The highest version the main record ever had (kept beside it, in state.version)."""
        try:
            text = (self.directory / "state.version").read_text().strip()
        except OSError:
            return 0
        return int(text) if text.isdigit() else 0

    def delete(self, key: str) -> None:
        with self._locked():
            self.path(key).unlink(missing_ok=True)

    def list(self, folder: str) -> list[str]:
        base = self.directory.joinpath("state.d", *check_key(folder))
        if not base.is_dir():
            return []
        return sorted(p.stem for p in base.glob("*.json"))


class ReadOnlyStore:
    """A record store whose writes stay in memory: what a read-only command loads through.

    Loading may rewrite records (an older layout is moved into shards); a command
    that must not write sees the result without anything reaching the disk.
    """

    def __init__(self, store: RecordStore) -> None:
        self._store = store
        self.description = store.description
        self._written: dict[str, tuple[Record, int] | None] = {}

    def read(self, key: str) -> tuple[Record, int] | None:
        return self._written[key] if key in self._written else self._store.read(key)

    def write(self, key: str, record: Record, version: int) -> int:
        current = self.read(key)
        if (current[1] if current else 0) != version:
            raise RecordConflict(f"{key!r}: version {current[1] if current else 0}, not {version}")
        self._written[key] = (record, version + 1)
        return version + 1

    def delete(self, key: str) -> None:
        self._written[key] = None

    def list(self, folder: str) -> list[str]:
        prefix = f"{folder}/"
        names = set(self._store.list(folder))
        for key, found in self._written.items():
            if key.startswith(prefix) and "/" not in key[len(prefix) :]:
                (names.add if found else names.discard)(key[len(prefix) :])
        return sorted(names)
