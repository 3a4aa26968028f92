"""write_tree_atomic tells another writer's edit of a published version from its own change.

Nothing of ours in a version is modified after ``..data`` points to it; these tests move
the published version's file times back instead of waiting for the clock.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ca_daemon.util.files import DATA, write_tree_atomic

pytestmark = pytest.mark.usefixtures("clean_env")

MODE = 0o644


def _age(root: Path) -> None:
    """As if the current version was published an hour ago."""
    hour_ago = time.time_ns() - 3600 * 10**9
    version = root / os.readlink(root / DATA)
    for dirpath, dirs, names in os.walk(version):
        for name in [*dirs, *names]:
            os.utime(Path(dirpath) / name, ns=(hour_ago, hour_ago), follow_symlinks=False)
    for path in (version, root / DATA):
        os.utime(path, ns=(hour_ago, hour_ago), follow_symlinks=False)


def _tree(**files: bytes) -> dict[str, tuple[bytes, int]]:
    return {name.replace("__", "/"): (content, MODE) for name, content in files.items()}


def test_a_change_of_its_own_is_not_drift(tmp_path: Path) -> None:
    write_tree_atomic(tmp_path, _tree(a=b"1", d__b=b"2"), managed=["a", "d"])
    _age(tmp_path)
    tree = write_tree_atomic(tmp_path, _tree(a=b"3", d__b=b"2", d__c=b"4"), managed=["a", "d"])
    assert tree.changed == ["a", "d/c"]
    assert tree.edited == []
    # Right after a publish too, with no time between (file times are coarse).
    again = write_tree_atomic(tmp_path, _tree(a=b"5", d__b=b"2"), managed=["a", "d"])
    assert again.edited == []


def test_an_edit_in_place_after_the_publish_is_drift_and_is_restored(tmp_path: Path) -> None:
    write_tree_atomic(tmp_path, _tree(a=b"1", d__b=b"2"), managed=["a", "d"])
    _age(tmp_path)
    (tmp_path / "d/b").write_bytes(b"garbage")
    tree = write_tree_atomic(tmp_path, _tree(a=b"1", d__b=b"2"), managed=["a", "d"])
    assert tree.edited == ["d/b (changed)"]
    assert (tmp_path / "d/b").read_bytes() == b"2"


def test_a_deleted_or_added_file_is_drift(tmp_path: Path) -> None:
    write_tree_atomic(tmp_path, _tree(a=b"1", d__b=b"2"), managed=["a", "d"])
    _age(tmp_path)
    (tmp_path / "d/b").unlink()
    (tmp_path / "d/planted").write_bytes(b"x")
    tree = write_tree_atomic(tmp_path, _tree(a=b"1", d__b=b"2"), managed=["a", "d"])
    assert sorted(tree.edited) == ["d/b (deleted)", "d/planted (added)"]
    assert (tmp_path / "d/b").read_bytes() == b"2"
    assert not (tmp_path / "d/planted").exists()
