"""A publisher that keeps what it found between passes reads no file when nothing moved,
and still finds every edit, replacement, addition and removal within one check."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ca_daemon.util import files as files_module
from ca_daemon.util.files import DATA, SeenFiles, tree_unchanged, write_tree_atomic

pytestmark = pytest.mark.usefixtures("clean_env")

MODE = 0o644
TREE = {"a": (b"1", MODE), "d/b": (b"2", MODE), "d/k": (b"key", 0o600)}
MANAGED = ["a", "d", "x"]


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file write_tree_atomic opens from now on."""
    opened: list[str] = []
    real = os.open

    def counting(path: str, flags: int, *args: int) -> int:
        opened.append(str(path))
        return real(path, flags, *args)

    monkeypatch.setattr(files_module.os, "open", counting)
    return opened


def test_a_second_check_reads_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = SeenFiles()
    write_tree_atomic(tmp_path, TREE, MANAGED, seen)  # writes the first version
    assert tree_unchanged(tmp_path, seen)  # what it wrote is known
    opened = _reads(monkeypatch)
    tree = write_tree_atomic(tmp_path, TREE, MANAGED, seen)
    assert tree.changed == [] and opened == []
    # Without what was seen, every file is read (as a process that just started does).
    write_tree_atomic(tmp_path, TREE, MANAGED)
    assert len(opened) == len(TREE)


class _Deferred:
    def __init__(self, content: bytes) -> None:
        self.sha256 = hashlib.sha256(content).digest()
        self._content = content
        self.made = 0

    def content(self) -> bytes:
        self.made += 1
        return self._content


def test_a_large_file_in_a_key_s_place_is_replaced_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _Deferred(b"sealed key")
    tree = {**TREE, "d/k": (key, 0o600)}
    write_tree_atomic(tmp_path, tree, MANAGED)
    big = _version(tmp_path) / "d/k"
    big.write_bytes(b"x" * (1 << 20))
    read: list[int] = []
    real = files_module._sha256
    monkeypatch.setattr(files_module, "_sha256", lambda b: read.append(len(b)) or real(b))
    tree_changes = write_tree_atomic(tmp_path, tree, MANAGED)
    assert tree_changes.changed == ["d/k"]
    assert all(n < 1 << 20 for n in read)
    assert (tmp_path / "d/k").read_bytes() == b"sealed key"


def test_a_deferred_content_is_made_only_to_be_written(tmp_path: Path) -> None:
    key = _Deferred(b"sealed key")
    tree = {**TREE, "d/k": (key, 0o600)}
    write_tree_atomic(tmp_path, tree, MANAGED)
    assert key.made == 1 and (tmp_path / "d/k").read_bytes() == b"sealed key"
    write_tree_atomic(tmp_path, tree, MANAGED)
    assert key.made == 1  # compared by its digest
    (tmp_path / "d/k").unlink()
    write_tree_atomic(tmp_path, tree, MANAGED)
    assert key.made == 2 and (tmp_path / "d/k").read_bytes() == b"sealed key"


def _version(root: Path) -> Path:
    return root / os.readlink(root / DATA)


def _edit_in_place(root: Path) -> None:
    # Same size: only the time tells. File times are coarse (a clock tick): let one pass.
    time.sleep(0.05)
    (_version(root) / "d/b").write_bytes(b"X")


def _replace(root: Path) -> None:
    path = _version(root) / "d/b"
    path.with_name("tmp").write_bytes(b"2")
    os.chmod(path.with_name("tmp"), MODE)
    os.replace(path.with_name("tmp"), path)  # same content, another file


def _add(root: Path) -> None:
    (_version(root) / "d/extra").write_bytes(b"x")


def _remove(root: Path) -> None:
    (_version(root) / "d/k").unlink()


def _chmod(root: Path) -> None:
    os.chmod(_version(root) / "d/k", 0o644)


def _copy_keeping_times(root: Path) -> None:
    # Same size, same mtime, same inode: only the ctime moves (`cp -p` over it).
    path = _version(root) / "d/b"
    before = path.stat()
    time.sleep(0.05)
    path.write_bytes(b"Y")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _add_at_the_top(root: Path) -> None:
    (root / "x").write_bytes(b"not ours")  # a managed name the tree does not hold


def _retarget_link(root: Path) -> None:
    (root / "a").unlink()
    (root / "a").write_bytes(b"1")


def _swap_data(root: Path) -> None:
    other = root / "..elsewhere"
    os.mkdir(other)
    os.symlink(other.name, root / "..tmp")
    os.replace(root / "..tmp", root / DATA)


CHANGES: dict[str, Callable[[Path], None]] = {
    "edited in place": _edit_in_place,
    "copied over keeping size and times": _copy_keeping_times,
    "a managed name added at the top": _add_at_the_top,
    "replaced": _replace,
    "added": _add,
    "removed": _remove,
    "chmod": _chmod,
    "top-level link replaced by a file": _retarget_link,
    "..data pointed elsewhere": _swap_data,
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_every_change_by_someone_else_is_found_at_the_next_check(
    tmp_path: Path, change: Callable[[Path], None]
) -> None:
    seen = SeenFiles()
    write_tree_atomic(tmp_path, TREE, MANAGED, seen)
    write_tree_atomic(tmp_path, TREE, MANAGED, seen)
    assert tree_unchanged(tmp_path, seen)
    change(tmp_path)
    assert not tree_unchanged(tmp_path, seen)
    write_tree_atomic(tmp_path, TREE, MANAGED, seen)  # repaired
    for rel, (content, mode) in TREE.items():
        assert (tmp_path / rel).read_bytes() == content, rel
        assert (tmp_path / rel).stat().st_mode & 0o777 == mode, rel
    assert not (tmp_path / "d/extra").exists() and not (tmp_path / "x").exists()
    write_tree_atomic(tmp_path, TREE, MANAGED, seen)
    assert tree_unchanged(tmp_path, seen)
