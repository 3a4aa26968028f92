"""Files written the safe way: atomically replaced, keys at mode 0600.

``write_atomic`` replaces one file. ``write_tree_atomic`` publishes a whole set of
files the way the kubelet's AtomicWriter publishes a Secret volume, so a reader sees
the old set or the new set, never a certificate of one with the key of the other.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

DATA = "..data"
_DATA_TMP = "..data_tmp"
# ..2026_12_01_08_00_00.<random>: the kubelet's name for a version directory.
_VERSION_FORMAT = "..%Y_%m_%d_%H_%M_%S."
_VERSION = re.compile(r"^\.\.\d{4}(_\d\d){5}\.")
DIR_MODE = 0o755


def ensure_private_dir(path: Path) -> None:
    """Make ``path`` (0700) unless it exists; refuse one that another user owns or may
    write: whoever can write there can swap the keys, the journal or the token."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.geteuid():
        raise PermissionError(
            errno.EPERM,
            f"owned by uid {info.st_uid}, not this daemon's uid {os.geteuid()}: refusing to "
            "keep keys there",
            str(path),
        )
    if info.st_mode & 0o022:
        raise PermissionError(
            errno.EPERM,
            f"mode {info.st_mode & 0o777:04o} lets other users write there: refusing to keep "
            "keys there (chmod go-w, or 0700)",
            str(path),
        )


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Replace ``path`` with ``data`` in one rename; False (and no write) when it already matches.

    Readers (Linkerd's fsnotify, nginx reloads, a human with cat) never see half a file,
    and the mode is set before the content is visible.
    """
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


# --- a whole directory, atomically ----------------------------------------------------------


class Deferred(Protocol):
    """A file's content known by its SHA-256 before it is made: a sealed key, made (and
    unsealed) only when the file must be written."""

    @property
    def sha256(self) -> bytes: ...

    def content(self) -> bytes: ...


Content = bytes | Deferred
# A file as found: (device, inode, size, mtime and ctime in ns, permission bits). The
# ctime too: a copy over it that keeps size and mtime (`cp -p`, `touch -d`) moves that.
_Identity = tuple[int, int, int, int, int, int]
# A directory as found: (inode, mtime in ns); an entry added or removed moves the mtime.
_Place = tuple[int, int]
# The most a key file may be to be read and compared (an RSA-4096 PEM is ~3.3 KB): a
# larger file in its place differs, and is replaced without being read.
_MAX_KEY_FILE = 64 * 1024


@dataclass(frozen=True)
class _InPlace:
    version: str  # what ..data points to
    root: _Place  # the root directory: a name added beside the links moves it
    dirs: dict[str, _Place]  # each directory of the version
    tops: tuple[str, ...]  # the top-level links


@dataclass
class SeenFiles:
    """What ``write_tree_atomic`` left or found in place at its last call: each file's
    identity with the SHA-256 of its content, each directory's place. A file whose
    identity has not moved since still holds that content, so a publisher that keeps
    this between passes reads only the files that moved."""

    held: dict[str, tuple[_Identity, bytes]] = field(default_factory=dict)
    # Set when the last call left the whole tree known; then :func:`tree_unchanged`
    # needs only an lstat a file and directory.
    whole: _InPlace | None = None


def tree_unchanged(root: Path, seen: SeenFiles) -> bool:
    """Whether ``root`` is still exactly as ``write_tree_atomic`` last left or found it:
    nothing replaced, edited, added or removed. Nothing is read: a pass that publishes
    the same files again can stop here."""
    whole = seen.whole
    if whole is None:
        return False
    version = f"{root}/{whole.version}"
    try:
        if _place(os.lstat(root)) != whole.root or os.readlink(root / DATA) != whole.version:
            return False
        if any(os.readlink(root / name) != f"{DATA}/{name}" for name in whole.tops):
            return False
        for rel, place in whole.dirs.items():
            if _place(os.lstat(f"{version}/{rel}" if rel else version)) != place:
                return False
        for rel, (identity, _) in seen.held.items():
            st = os.lstat(f"{version}/{rel}")
            if not stat.S_ISREG(st.st_mode) or _identity(st) != identity:
                return False
    except OSError:
        return False
    return True


def _record_in_place(
    root: Path, version: Path, files: Mapping[str, tuple[Content, int]]
) -> SeenFiles:
    """What ``root`` holds right after a write of ``files`` (one lstat each; taken last,
    as hard links made or removed move the ctime of the files they share)."""
    held = {
        rel: (_identity(os.lstat(f"{version}/{rel}")), _digest(content))
        for rel, (content, _) in files.items()
    }
    dirs: dict[str, _Place] = {}
    for _ in _walk_files(version, dirs):
        pass
    tops = tuple(sorted({rel.split("/", 1)[0] for rel in files}))
    return SeenFiles(held, _InPlace(version.name, _place(os.lstat(root)), dirs, tops))


@dataclass(frozen=True)
class TreeChanges:
    changed: list[str]
    # Entries of the version that was current which someone else changed, replaced,
    # added or deleted after it was published (and which this write replaced).
    edited: list[str]


def write_tree_atomic(
    root: Path,
    files: Mapping[str, tuple[Content, int]],
    managed: Collection[str],
    seen: SeenFiles | None = None,
) -> TreeChanges:
    """Make ``root`` hold exactly ``files`` (relative path → content, mode); say what changed.

    Layout, as the kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go):

        root/..2026_12_01_08_00_00.Ab3x/   one immutable version of every file
        root/..data -> ..2026_12_01_08_00_00.Ab3x
        root/<top> -> ..data/<top>         for every top-level name of ``files``

    A new version is written beside the old one, then ``..data`` is swapped in one
    rename (watchers such as Linkerd's identity controller see a CREATE of ``..data``),
    then the old version is removed. Since every path resolves through ``..data``, a
    reader that sees the same ``..data`` target before and after its reads has read
    one version. Nothing is written when ``..data`` already holds ``files``.

    ``managed`` names the top-level entries this tree owns: one of them that ``files``
    no longer has is removed, also when an older flat layout left it as a real file or
    directory.

    Someone else's edit is told from a change of our own by time: nothing of ours in a
    version is modified after ``..data`` was made to point to it, so an entry modified
    later (or a directory whose entries were, for a deleted file) was edited by another
    writer. A file whose size or type differs is never read, however large it is; a
    :class:`Deferred` content is compared by its digest and made only to be written.
    With ``seen`` (kept by the caller between calls) a file whose identity is as last
    found is not read again.
    """
    root.mkdir(parents=True, exist_ok=True)
    current = _current_version(root)
    dirs: dict[str, _Place] = {}
    existing = set(_walk_files(current, dirs)) if current is not None else set()
    held: dict[str, tuple[_Identity, bytes]] = {}
    before = seen.held if seen is not None else None
    if seen is not None:
        seen.whole = None  # until this call has finished
    same = {
        rel for rel in files.keys() & existing if _holds(current, rel, files[rel], before, held)
    }
    changed = sorted((files.keys() - same) | (existing - files.keys()))
    edited = _edited_since_published(root, current, changed, files.keys(), existing)
    if changed:
        new = _write_version(root, files, current, same)
        _swap_data(root, new)
        current = new
    top = {rel.split("/", 1)[0] for rel in files}
    changed += _link_top_level(root, top, set(managed) - top)
    _remove_old_versions(root, keep=current)
    if seen is not None and current is not None:
        if changed:
            found = _record_in_place(root, current, files)
            seen.held, seen.whole = found.held, found.whole
        else:
            seen.held = held
            if held.keys() == existing:
                tops = tuple(sorted(top))
                seen.whole = _InPlace(current.name, _place(os.lstat(root)), dirs, tops)
    return TreeChanges(changed, edited)


def _current_version(root: Path) -> Path | None:
    """The version directory ``..data`` points to, if it is one of ours and exists."""
    try:
        target = os.readlink(root / DATA)
    except OSError:  # missing, or not a symlink
        return None
    version = root / target
    return version if _VERSION.match(target) and version.is_dir() else None


# The helpers below run once per file (15,000 for 5,000 Kong clients, every pass): they
# join strings rather than build Paths, which costs several times the system calls.


def _walk_files(version: Path, dirs: dict[str, _Place]) -> Iterator[str]:
    """Every file under ``version``; each directory's (inode, mtime) noted in ``dirs``."""
    top = len(str(version)) + 1
    for dirpath, _dirs, names in os.walk(version):  # never follows symlinks
        base = dirpath[top:]
        dirs[base] = _place(os.lstat(dirpath))
        for name in names:
            yield f"{base}/{name}" if base else name


def _holds(
    version: Path | None,
    rel: str,
    want: tuple[Content, int],
    before: Mapping[str, tuple[_Identity, bytes]] | None,
    held: dict[str, tuple[_Identity, bytes]],
) -> bool:
    """Whether ``version/rel`` is a regular file with exactly this content and mode.

    With ``before`` (what held last time), a file found as it was then, for the same
    content, is not read again; every file that holds is noted in ``held``."""
    if version is None:
        return False
    content, mode = want
    path = f"{version}/{rel}"
    digest = None
    if before is not None:
        digest = _digest(content)
        try:
            st = os.lstat(path)
        except OSError:
            return False
        identity = _identity(st)
        if (
            stat.S_ISREG(st.st_mode)
            and identity[5] == mode
            and before.get(rel) == (identity, digest)
        ):
            held[rel] = (identity, digest)
            return True
    try:
        # O_NONBLOCK: a FIFO put in a file's place must not hang the pass in open().
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != mode:
            return False
        if not isinstance(content, bytes):
            small = st.st_size <= _MAX_KEY_FILE
            same = small and _sha256(handle.read()) == content.sha256
        else:
            # The size first: a changed certificate is read no further.
            same = st.st_size == len(content) and handle.read() == content
    if same and digest is not None:
        held[rel] = (_identity(st), digest)
    return same


def _identity(st: os.stat_result) -> _Identity:
    return (
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        stat.S_IMODE(st.st_mode),
    )


def _place(st: os.stat_result) -> _Place:
    return (st.st_ino, st.st_mtime_ns)


def _digest(content: Content) -> bytes:
    return _sha256(content) if isinstance(content, bytes) else content.sha256


def _sha256(content: bytes) -> bytes:
    return hashlib.sha256(content).digest()


def _edited_since_published(
    root: Path,
    current: Path | None,
    changed: Collection[str],
    wanted: Collection[str],
    existing: Collection[str],
) -> list[str]:
    """Which of ``changed`` another writer touched in ``current`` after it was published."""
    if current is None or not changed:
        return []
    published = os.lstat(root / DATA).st_mtime_ns
    edited = []
    for rel in changed:
        if rel not in existing:  # missing: deleted if its directory was modified since
            what, path = "deleted", f"{current}/{rel.rpartition('/')[0]}"
        else:
            what, path = ("changed" if rel in wanted else "added"), f"{current}/{rel}"
        try:
            if os.lstat(path).st_mtime_ns > published:
                edited.append(f"{rel} ({what})")
        except OSError:  # its directory is not there either: new in this write
            pass
    return edited


def _write_version(
    root: Path,
    files: Mapping[str, tuple[Content, int]],
    current: Path | None,
    same: Collection[str],
) -> Path:
    """A new version directory holding ``files``.

    Versions are never modified once ``..data`` points to them, so a file that has not
    changed is hard-linked from the current version, and identical files within this
    version (every ``ca.crt`` is the bundle) share one inode: renewing one of 5,000
    Kong clients writes two files, not 15,000, and fsyncs only what is new.
    """
    new = tempfile.mkdtemp(prefix=time.strftime(_VERSION_FORMAT, time.gmtime()), dir=root)
    try:
        os.chmod(new, DIR_MODE)
        made = {""}
        written: dict[tuple[bytes, int], str] = {}
        for rel in sorted(files):
            want, mode = files[rel]
            path = f"{new}/{rel}"
            _make_dirs(new, rel.rpartition("/")[0], made)
            source = f"{current}/{rel}" if current is not None and rel in same else None
            if source is not None and _link(source, path):
                continue
            content = want if isinstance(want, bytes) else want.content()
            source = written.get((content, mode))
            if source is not None and _link(source, path):
                continue
            _write_new(path, content, mode)
            written[(content, mode)] = path
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return Path(new)


def _make_dirs(top: str, rel: str, made: set[str]) -> None:
    if rel in made:
        return
    _make_dirs(top, rel.rpartition("/")[0], made)
    os.mkdir(f"{top}/{rel}")
    os.chmod(f"{top}/{rel}", DIR_MODE)  # not the umask's idea of it
    made.add(rel)


def _link(source: str, path: str) -> bool:
    try:
        os.link(source, path, follow_symlinks=False)
    except OSError:  # a filesystem without hard links: write a copy instead
        return False
    return True


def _write_new(path: str, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(fd, mode)  # the umask may have removed bits
        handle.write(content)
        handle.flush()
        # Durable before ..data points to it: after a crash, never an empty key file.
        os.fsync(fd)


def _swap_data(root: Path, version: Path) -> None:
    tmp = root / _DATA_TMP
    tmp.unlink(missing_ok=True)
    os.symlink(version.name, tmp)
    os.rename(tmp, root / DATA)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_top_level(root: Path, top: Collection[str], stale: Collection[str]) -> list[str]:
    """Point ``root/<name>`` at ``..data/<name>`` for each name; remove the stale ones.

    Replacing a file by a symlink is one rename. A directory (the flat layout an older
    ca-daemon wrote, migrated once) cannot be renamed over, so it is moved aside first:
    for that one publish, its path is missing for the time between two renames.
    """
    changed = []
    for name in sorted(top):
        path, want = root / name, f"{DATA}/{name}"
        try:
            if os.readlink(path) == want:
                continue
        except OSError:  # missing, or a real file or directory
            pass
        tmp = root / f"..{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(want, tmp)
        _move_aside_if_dir(root, path)
        os.replace(tmp, path)
        changed.append(f"{name} -> {want}")
    for name in sorted(stale):
        path = root / name
        if path.is_symlink() or path.exists():
            _move_aside_if_dir(root, path)
            path.unlink(missing_ok=True)
            changed.append(name)
    return changed


def _move_aside_if_dir(root: Path, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        aside = tempfile.mkdtemp(prefix=time.strftime(_VERSION_FORMAT, time.gmtime()), dir=root)
        os.rename(path, Path(aside) / path.name)  # removed with the old versions


def _remove_old_versions(root: Path, keep: Path | None) -> None:
    """Every version directory but ``keep``: the one swapped out, and any a crash left."""
    kept = keep.name if keep is not None else None
    for entry in os.scandir(root):
        old = _VERSION.match(entry.name) and entry.name != kept
        if old and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
    (root / _DATA_TMP).unlink(missing_ok=True)
