"""`ca-daemon plan` predicts what the daemon then does, on the embedded default's parts.

A local anchor, file journal and directory publisher are bootstrapped; the forecast is
computed from the journal as the command reads it; then the real engine is driven with
a clock moving 10 minutes a pass. Every dated event of the forecast must be seen at
the first pass at or after its date: the first renewal of each credential, and every
phase of a scheduled root rotation, its retirement and the next one's start.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.journal.open import file_journal
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.report.forecast import forecast, load_state
from ca_daemon.rotation.engine import Engine
from tests.support.cli import ca_daemon
from tests.support.rotation_harness import Clock

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 1, tzinfo=UTC)
TICK = timedelta(minutes=10)
WINDOW = timedelta(hours=250)
ROOT_PHASES = ("PrepareRoot", "Propagate", "ConfirmBundle", "Activate", "StartRetiring", "Retire")


def _config(tmp_path: Path) -> Path:
    """Root due at 120h; the first renewals come before it; the long-lived ledger client
    decides when the old root may go (200h), so every phase has a known date."""
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(tmp_path / "data")}},
                "publish": {"kubernetes": {"enabled": False}},
                "root": {"lifetime": "240h", "rotate_before": "120h"},
                "linkerd": {"issuer": {"lifetime": "48h", "rotate_before": "16h"}},
                "kong": {
                    "intermediate": {"lifetime": "230h", "rotate_before": "30h"},
                    "clients": [
                        {
                            "name": "payments",
                            "common_name": "kong.payments.upstream",
                            "lifetime": "30h",
                            "rotate_before": "10h",
                        },
                        {
                            "name": "orders",
                            "common_name": "kong.orders.upstream",
                            "lifetime": "30h",
                            "rotate_before": "10h",
                        },
                        {
                            "name": "ledger",
                            "common_name": "kong.ledger.upstream",
                            "lifetime": "200h",
                            "rotate_before": "50h",
                        },
                    ],
                },
                "rotation": {"propagation_delay": "10m", "clock_skew": "5m", "jitter": 0.05},
            }
        )
    )
    return path


def _engine(settings: Settings, clock: Clock) -> Engine:
    data = settings.anchor.local.dir
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    return Engine(
        settings,
        LocalAnchor(data, passphrase),
        file_journal(settings, passphrase),
        [DirectoryPublisher(settings.publish_directory)],
        clock=clock,
    )


def _snapshot(directory: Path) -> dict[str, int]:
    seen = {}
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            path = Path(root, name)
            seen[str(path)] = path.lstat().st_mtime_ns
    return seen


def _first_tick_at_or_after(at: datetime) -> datetime:
    ticks = -((T0 - at) // TICK)  # ceiling division
    return T0 + ticks * TICK


def test_the_forecast_dates_are_when_the_engine_acts(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path))
    clock = Clock(T0)
    engine = _engine(settings, clock)
    assert engine.reconcile().ok  # the bootstrap at T0

    data = settings.anchor.local.dir
    before = _snapshot(data)
    state = load_state(settings)  # as `ca-daemon plan` reads it
    start = T0 + TICK
    events = forecast(state, settings, start, T0 + WINDOW)
    assert _snapshot(data) == before, "the forecast wrote to the data directory"
    exact = [e for e in events if e.exact]

    seen: dict[datetime, set[tuple[str, str]]] = defaultdict(set)
    actions: list[tuple[datetime, str, str]] = []
    now = start
    while now <= T0 + WINDOW:
        clock.now = now
        result = engine.reconcile()
        assert result.ok, (now, result.errors)
        for step in result.steps:
            seen[now].add((step.action, step.name))
            actions.append((now, step.action, step.name))
        now += TICK

    missed = [e for e in exact if (e.action, e.name) not in seen[_first_tick_at_or_after(e.at)]]
    assert not missed, [(e.at, e.action, e.name, e.reason) for e in missed]

    # What was checked: each credential's first renewal, at a date the jitter moved ...
    due = {(e.action, e.name) for e in exact if e.reason.startswith("due")}
    assert {
        ("IssueKongClient", "payments"),
        ("IssueKongClient", "orders"),
        ("IssueLinkerdIssuer", settings.linkerd.issuer_secret),
    } <= due
    # ... and every phase of the rotation of root-1 (at 120h) up to its retirement (at
    # 200h, when the ledger client issued at T0 expires) and the start of root-4's.
    phases = [e for e in exact if e.action in ROOT_PHASES]
    assert [e.action for e in phases] == [*ROOT_PHASES, *ROOT_PHASES[:5]]
    assert phases[0].at == T0 + timedelta(hours=120)
    assert phases[5].at == T0 + timedelta(hours=200) + settings.rotation.clock_skew
    # Every root-rotation phase the engine took in the window was forecast, at its tick.
    taken = [(at, action) for at, action, _ in actions if action in ROOT_PHASES]
    assert taken == [(_first_tick_at_or_after(e.at), e.action) for e in phases]


def _plan_is_wired(tmp_path: Path) -> bool:
    return ca_daemon("plan", "--help", cwd=tmp_path).returncode == 0


def test_the_plan_command_writes_nothing(tmp_path: Path) -> None:
    if not _plan_is_wired(tmp_path):
        pytest.skip("`plan` is not wired into ca_daemon/cli.py yet")
    config = _config(tmp_path)
    settings = load_settings(config)
    data = settings.anchor.local.dir

    # No state yet: the bootstrap is forecast and not even the data directory is made.
    fresh = ca_daemon("plan", "--json", "--config", str(config), cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout)[0]["action"] == "CreateRoot"
    assert not data.exists()

    clock = Clock(datetime.now(UTC))
    assert _engine(settings, clock).reconcile().ok
    before = _snapshot(data)
    done = ca_daemon("plan", "--json", "--until", "300h", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _snapshot(data) == before
    events = json.loads(done.stdout)
    assert {"PrepareRoot", "Activate", "Retire"} <= {e["action"] for e in events}
    assert set(events[0]) >= {"at", "kind", "name", "action", "reason", "exact"}
    table = ca_daemon("plan", "--config", str(config), cwd=tmp_path)
    assert table.returncode == 0 and "PrepareRoot" in table.stdout
    bad = ca_daemon("plan", "--until", "soon", "--config", str(config), cwd=tmp_path)
    assert bad.returncode == 2
    assert _snapshot(data) == before
