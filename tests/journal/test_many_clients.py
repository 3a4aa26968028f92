"""A normal cluster's worth of Kong clients is issued in one pass, each in its own record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ca_daemon.config.loading import load_settings
from ca_daemon.journal.format import SHARDS
from ca_daemon.report.verify import Thresholds, verify_directory
from ca_daemon.service.wiring import build_engine
from tests.support.clock import NOW
from tests.support.journal_files import credential_docs, shard_files
from tests.support.settings import local_config, numbered_clients

pytestmark = pytest.mark.integration

CLIENTS = 1000


def test_a_thousand_clients_are_issued_in_one_pass(tmp_path: Path) -> None:
    config = local_config(tmp_path, kong=numbered_clients(CLIENTS))
    settings = load_settings(config)
    result = build_engine(settings).reconcile(now=NOW)
    assert result.ok, result.errors[:5]
    issued = [s for s in result.steps if s.action == "IssueKongClient" and s.ok]
    assert len(issued) == CLIENTS
    data = settings.anchor.local.dir
    assert len([k for k in credential_docs(data) if k.startswith("kong/")]) == CLIENTS
    # Journaled in shards: one write per shard touched, not one per client.
    records = shard_files(data)
    assert len(records) <= SHARDS
    # The CA record stays small whatever the number of clients: no key, no client in it.
    record = (data / "state.json").read_text()
    assert len(record) < 8192 and "c0999" not in record
    # Far below Vault's 1 MiB entry limit, at ~CLIENTS / SHARDS credentials a shard.
    assert max(len(p.read_bytes()) for p in records) < 4096 * (CLIENTS // SHARDS + 8)
    out = settings.publish_directory
    assert len(list((out / "kong" / "clients").iterdir())) == CLIENTS
    report = verify_directory(out, NOW, Thresholds.from_settings(settings))
    assert report.ok, report.problems[:5]
    # A second pass issues nothing and writes no record.
    mtimes = {p: p.stat().st_mtime_ns for p in records}
    again = build_engine(settings).reconcile(now=NOW)
    assert again.ok and again.steps == []
    assert {p: p.stat().st_mtime_ns for p in records} == mtimes
    assert json.loads(record)["state"]["serial"] == 2
