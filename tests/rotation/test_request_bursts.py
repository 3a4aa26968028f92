"""A burst of manual requests in one process is journaled without refusing any (they
queue on the engine, not on check-and-set retries), and one pass carries them all out."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.journal.open import file_journal
from ca_daemon.model.state import OpState
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.rotation.engine import Engine
from tests.support.clock import NOW

pytestmark = pytest.mark.usefixtures("clean_env")

CLIENTS = 40
REQUESTS = 200


def _settings(tmp_path: Path) -> Settings:
    path = tmp_path / "config.yaml"
    clients = [{"name": f"c{i}", "common_name": f"kong.c{i}.upstream"} for i in range(CLIENTS)]
    path.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(tmp_path / "data")}},
                "publish": {"kubernetes": {"enabled": False}},
                "kong": {"clients": clients},
            }
        )
    )
    return load_settings(path)


def _engine(settings: Settings) -> Engine:
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    return Engine(
        settings,
        LocalAnchor(settings.anchor.local.dir, passphrase),
        file_journal(settings, passphrase),
        [DirectoryPublisher(settings.publish_directory)],
    )


def test_two_hundred_concurrent_requests_are_all_journaled_and_carried_out(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    engine = _engine(settings)
    assert engine.reconcile(now=NOW).ok
    at = NOW + timedelta(minutes=1)
    targets = [f"kong/c{i}" for i in range(CLIENTS)] + ["linkerd-issuer", "kong-intermediate"]
    picks = [random.Random(n).choice(targets) for n in range(REQUESTS)]
    stop = threading.Event()

    def passes() -> None:  # the daemon's own passes go on meanwhile, writing the record
        while not stop.is_set():
            engine.reconcile(now=at)

    beside = threading.Thread(target=passes)
    beside.start()
    try:
        with ThreadPoolExecutor(max_workers=50) as pool:
            ids = list(pool.map(lambda t: engine.request_rotation(t, "burst", now=at), picks))
    finally:
        stop.set()
        beside.join()
    assert len(ids) == REQUESTS  # none refused
    result = engine.reconcile(now=at)
    assert result.ok, result.errors
    ops = engine.journal.load_ca()[0].operations
    assert {op.id for op in ops} >= set(ids)
    assert all(op.state is OpState.SUCCEEDED for op in ops if op.id in set(ids)), [
        (op.target, op.state, op.result) for op in ops if op.state is not OpState.SUCCEEDED
    ]


def test_many_queued_operations_settle_in_one_pass(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    engine = _engine(settings)
    assert engine.reconcile(now=NOW).ok
    at = NOW + timedelta(minutes=1)
    for i in range(CLIENTS):
        engine.request_rotation(f"kong/c{i}", "one each", now=at)
    result = engine.reconcile(now=at)
    assert result.ok, result.errors
    ops = engine.journal.load_ca()[0].operations
    assert [op.state for op in ops] == [OpState.SUCCEEDED] * CLIENTS
    reissued = [s.name for s in result.steps if s.action == "IssueKongClient"]
    assert sorted(reissued) == sorted(f"c{i}" for i in range(CLIENTS))
