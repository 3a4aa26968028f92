"""A steady pass reads what changed, not every credential record: a shard file that did
not move is not read again (nor, on Vault, a shard whose version did not move)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ca_daemon.config.settings import Settings
from ca_daemon.journal.format import SHARD_FOLDER
from ca_daemon.journal.store import records as records_module
from ca_daemon.journal.store.records import FileRecordStore
from ca_daemon.service.wiring import build_engine
from tests.support.clock import NOW

pytestmark = pytest.mark.usefixtures("clean_env")


def _opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real = os.open

    def counting(path: str | Path, flags: int, *args: int) -> int:
        opened.append(str(path))
        return real(path, flags, *args)

    monkeypatch.setattr(records_module.os, "open", counting)
    return opened


def test_a_steady_pass_reads_no_shard_file(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    clients = [{"name": f"c{i}", "common_name": f"c{i}.upstream"} for i in range(200)]
    settings = make_settings({"kong": {"clients": clients}})
    engine = build_engine(settings)  # as `run` wires it: local anchor, files, directory
    assert engine.reconcile(now=NOW).ok
    opened = _opened(monkeypatch)
    assert engine.reconcile(now=NOW).ok  # the first load after issuing reads what it wrote
    shards = [p for p in opened if f"/{SHARD_FOLDER}/" in p]
    assert len(shards) > 50  # 200 clients in 64 shards
    opened.clear()
    steady = engine.reconcile(now=NOW)
    assert steady.ok and steady.steps == []
    assert [p for p in opened if f"/{SHARD_FOLDER}/" in p] == []
    # The CA record is read afresh (requests land there); nothing else of the journal.
    data, out = str(settings.anchor.local.dir), str(settings.publish_directory)
    journal = {Path(p).name for p in opened if p.startswith(data) and not p.startswith(out)}
    assert journal == {"state.json"}


def test_a_record_file_that_moved_is_read_again(tmp_path: Path) -> None:
    store, other = FileRecordStore(tmp_path), FileRecordStore(tmp_path)
    store.write("shards/01", {"credentials": {"a": "1"}}, 0)
    assert store.read("shards/01") == ({"credentials": {"a": "1"}}, 1)
    other.write("shards/01", {"credentials": {"a": "2"}}, 1)  # another process
    assert store.read("shards/01") == ({"credentials": {"a": "2"}}, 2)
    # Edited in place, same size (a clock tick later, as file times are coarse).
    path = store.path("shards/01")
    doc = json.loads(path.read_text())
    doc["state"]["credentials"]["a"] = "3"
    stat_before = path.stat()
    path.write_text(json.dumps(doc, indent=1))
    os.utime(path, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 10**7))
    assert store.read("shards/01") == ({"credentials": {"a": "3"}}, 2)
    path.unlink()
    assert store.read("shards/01") is None


def test_the_check_and_set_never_trusts_what_it_read_before(tmp_path: Path) -> None:
    store, other = FileRecordStore(tmp_path), FileRecordStore(tmp_path)
    store.write("shards/01", {"credentials": {}}, 0)
    assert store.read("shards/01") is not None
    other.write("shards/01", {"credentials": {"b": "x"}}, 1)
    with pytest.raises(records_module.RecordConflict):
        store.write("shards/01", {"credentials": {}}, 1)
