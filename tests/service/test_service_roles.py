"""The service as the leader and as a standby, over one journal (local files, shared the
way two Pods share Vault's KV): when each is ready, and what a standby does with a
request asked of it (journals it, and nothing else; the leader carries it out)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.settings import Settings
from ca_daemon.journal.open import file_journal
from ca_daemon.model.state import OpState
from ca_daemon.model.world import TrustWorld
from ca_daemon.publish.base import PublishReport
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.rotation.engine import Engine
from ca_daemon.service.metrics import Metrics
from ca_daemon.service.service import DaemonService, Leadership
from tests.support.clock import NOW
from tests.support.rotation_harness import Clock
from tests.support.settings import two_clients

pytestmark = pytest.mark.usefixtures("clean_env")


class Watching:
    """A publisher that notes whether the service called itself ready while publishing."""

    description = "watching"

    def __init__(self) -> None:
        self.service: DaemonService | None = None
        self.ready_while_publishing: list[str | None] = []

    def publish(self, world: TrustWorld) -> PublishReport:
        assert self.service is not None
        self.ready_while_publishing.append(self.service.readiness())
        return PublishReport(self.description)


def _service(
    settings: Settings, *publishers: Watching, leader: bool = True, clock: Clock | None = None
) -> DaemonService:
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    clock = clock or Clock(NOW)
    engine = Engine(
        settings,
        LocalAnchor(settings.anchor.local.dir, passphrase),
        file_journal(settings, passphrase),
        [DirectoryPublisher(settings.publish_directory), *publishers],
        clock=clock,
    )
    service = DaemonService(settings, engine, Metrics(), clock)
    service.leadership = Leadership(leader=leader, holder=None if leader else "the-leader")
    return service


def _leader_and_standby(settings: Settings, clock: Clock) -> tuple[DaemonService, DaemonService]:
    """Two replicas on one journal: the leader bootstrapped it, the standby has read it."""
    leader = _service(settings, clock=clock)
    assert leader.tick().ok
    standby = _service(settings, leader=False, clock=clock)
    standby.tick()
    return leader, standby


def _files(data: Path) -> dict[str, bytes]:
    """Every file under the data directory: journal, anchor, what is published."""
    return {str(p.relative_to(data)): p.read_bytes() for p in data.rglob("*") if p.is_file()}


def test_the_leader_is_ready_once_loaded_not_when_its_first_pass_ends(tmp_path: Path) -> None:
    """A first issue at 5,000 clients takes a minute: readiness must not wait for it."""
    settings = two_clients(tmp_path)
    watching = Watching()
    service = _service(settings, watching)
    watching.service = service
    assert service.readiness() == "the first pass has not run yet"
    assert service.tick().ok
    assert watching.ready_while_publishing == [None]  # ready in the middle of the pass


def test_a_standby_is_ready_once_it_read_the_journal(tmp_path: Path) -> None:
    settings = two_clients(tmp_path)
    assert _service(settings).tick().ok  # the leader bootstrapped the journal
    standby = _service(settings, leader=False)
    assert standby.readiness() is not None
    standby.tick()
    assert standby.readiness() is None


def test_a_standby_journals_a_request_and_the_leader_carries_it_out(tmp_path: Path) -> None:
    settings = two_clients(tmp_path)
    clock = Clock(NOW)
    leader, standby = _leader_and_standby(settings, clock)
    clock.now = NOW + timedelta(minutes=1)
    woken: list[int] = []
    standby.on_wake(lambda: woken.append(1))
    data = settings.anchor.local.dir
    assert settings.publish_directory.is_relative_to(data)
    before = _files(data)

    dry = standby.dry_run("kong/payments", "asked of the standby")
    assert [s["name"] for s in dry["steps"] if s["action"] == "IssueKongClient"] == ["payments"]
    op_id = standby.request("kong/payments", "asked of the standby")
    assert standby.request("kong/payments", "again") == op_id  # one operation per target

    # Only the CA record changed (the request): no credential, no CA, nothing published,
    # no pass woken.
    after = _files(data)
    assert sorted(after) == sorted(before)
    changed = sorted(p for p in after if after[p] != before[p])
    assert changed == ["state.json", "state.version"], changed
    assert woken == []
    view = standby.operation(op_id)
    assert view is not None and view["state"] == OpState.QUEUED.value

    # The leader finds it at its next pass.
    result = leader.tick()
    assert result.ok, result.errors
    assert [s.name for s in result.steps if s.action == "IssueKongClient"] == ["payments"]
    done = standby.operation(op_id)
    assert done is not None and done["state"] == OpState.SUCCEEDED.value


def test_a_standby_tells_what_a_rotation_waits_for_as_the_leader_does(tmp_path: Path) -> None:
    """Behind a Service, `rotate --wait` polls either replica: both must say the same, or
    its progress lines flap. The standby reads the wait from the journal."""
    settings = two_clients(tmp_path)
    clock = Clock(NOW)
    leader, standby = _leader_and_standby(settings, clock)
    op_id = standby.request("trust-anchor", "drill")
    phases = []
    for minutes in (1, 2, 12, 13):  # prepare and propagate, the delay, activate, retiring
        clock.now = NOW + timedelta(minutes=minutes)
        assert leader.tick().ok
        said, journaled = leader.operation(op_id), standby.operation(op_id)
        assert said is not None and journaled is not None
        assert journaled["waiting_for"] == said["waiting_for"], minutes
        phases.append((said["phase"], said["waiting_for"] is not None))
    assert ("propagating", True) in phases and ("retiring", True) in phases, phases
