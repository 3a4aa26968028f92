"""Leader election's decisions (acquire, renew, take over, wait) as client-go makes them,
and the elector's view of leadership on the monotonic clock, against an in-memory Lease."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest

from ca_daemon.daemon import Backoff
from ca_daemon.kube import KubeError
from ca_daemon.leader import (
    LeaderElector,
    LeaseRecord,
    LostRace,
    decide,
    new_identity,
    released,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
DURATION = timedelta(seconds=15)


def _held(holder: str, renewed: datetime, transitions: int = 3) -> LeaseRecord:
    return LeaseRecord(holder, 15, NOW - timedelta(hours=1), renewed, transitions, "41")


def test_an_absent_lease_is_created_ours() -> None:
    d = decide(None, NOW, "me", DURATION)
    assert d.action == "create"
    assert d.lease == LeaseRecord("me", 15, NOW, NOW, 0, None)


def test_our_lease_is_renewed_keeping_acquire_time_and_transitions() -> None:
    current = _held("me", NOW - timedelta(seconds=2))
    d = decide(current, NOW, "me", DURATION)
    assert d.action == "update"
    assert d.lease == replace(current, renew_time=NOW)
    assert d.lease is not None and d.lease.resource_version == "41"  # optimistic concurrency


def test_a_live_lease_of_another_is_waited_for() -> None:
    current = _held("other", NOW - timedelta(seconds=15))  # exactly at its end: still held
    assert decide(current, NOW, "me", DURATION).action == "wait"
    assert decide(current, NOW, "me", DURATION).lease == current


@pytest.mark.parametrize(
    "current",
    [
        _held("other", NOW - timedelta(seconds=16)),  # expired
        _held("", NOW - timedelta(seconds=1)),  # released
        replace(_held("other", NOW), renew_time=None),
    ],
    ids=["expired", "released", "never-renewed"],
)
def test_an_expired_or_released_lease_is_taken_over(current: LeaseRecord) -> None:
    d = decide(current, NOW, "me", DURATION)
    assert d.action == "update"
    assert d.lease == LeaseRecord("me", 15, NOW, NOW, 4, "41")


def test_release_empties_the_holder_with_a_one_second_lease() -> None:
    r = released(_held("me", NOW), NOW)
    assert (r.holder, r.duration_seconds, r.transitions) == ("", 1, 3)
    assert decide(r, NOW, "other", DURATION).action == "update"


def test_identities_are_the_hostname_and_a_random_suffix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOSTNAME", "ca-daemon-7d9f")
    a, b = new_identity(), new_identity()
    assert a.startswith("ca-daemon-7d9f_") and b.startswith("ca-daemon-7d9f_") and a != b


@dataclass
class MemoryLease:
    """One Lease with resourceVersion checks, as the API server keeps it."""

    lease: LeaseRecord | None = None
    version: int = 0
    fail: bool = False
    writes: list[LeaseRecord] = field(default_factory=list)
    description: str = "Lease test/ca-daemon"

    def read(self) -> LeaseRecord | None:
        if self.fail:
            raise KubeError("read: API server unreachable")
        return self.lease

    def write(self, action: Literal["create", "update"], lease: LeaseRecord) -> LeaseRecord:
        if self.fail:
            raise KubeError("write: API server unreachable")
        stored_version = None if self.lease is None else self.lease.resource_version
        if action == "create" and self.lease is not None:
            raise LostRace("already exists")
        if action == "update" and lease.resource_version != stored_version:
            raise LostRace("the object has been modified")
        self.version += 1
        self.lease = replace(lease, resource_version=str(self.version))
        self.writes.append(self.lease)
        return self.lease


@dataclass
class Clocks:
    mono: float = 1000.0
    wall: datetime = NOW

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)


def _elector(store: MemoryLease, identity: str, clocks: Clocks) -> LeaderElector:
    return LeaderElector(
        store,  # type: ignore[arg-type]
        identity,
        timedelta(seconds=4),
        timedelta(seconds=3),
        timedelta(seconds=1),
        monotonic=lambda: clocks.mono,
        wall=lambda: clocks.wall,
    )


def test_two_candidates_one_leads_then_the_other_takes_over_an_expired_lease() -> None:
    store, clocks = MemoryLease(), Clocks()
    a, b = _elector(store, "a", clocks), _elector(store, "b", clocks)
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    assert b.holder() == "a" and a.holder() == "a"
    for _ in range(5):  # a renews every retry; b keeps waiting
        clocks.advance(1)
        assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    # a stops (paused): it stops leading after renew_deadline, before its lease ends...
    clocks.advance(3)
    assert not a.is_leader()
    assert not b.try_acquire_or_renew()  # ...and b waits until the lease has expired.
    clocks.advance(1.5)
    assert b.try_acquire_or_renew() and b.is_leader()
    assert store.lease is not None and store.lease.transitions == 1
    # a resumes: it sees b, and never writes over b's lease.
    writes = len(store.writes)
    assert not a.try_acquire_or_renew() and a.holder() == "b"
    assert len(store.writes) == writes


def test_a_write_from_a_stale_read_loses_the_race() -> None:
    store, clocks = MemoryLease(), Clocks()
    a, b = _elector(store, "a", clocks), _elector(store, "b", clocks)
    assert a.try_acquire_or_renew()
    stale = store.lease
    clocks.advance(10)
    assert b.try_acquire_or_renew()
    store.lease, kept = stale, store.lease  # a's read sees the old object...
    assert kept is not None
    real_read = store.read
    store.read = lambda: stale  # type: ignore[method-assign]
    store.lease = kept  # ...but the server holds b's: the update carries a stale version
    assert not a.try_acquire_or_renew()
    store.read = real_read  # type: ignore[method-assign]
    assert store.lease == kept and not a.is_leader()


def test_a_leader_that_cannot_renew_stops_leading_within_the_renew_deadline() -> None:
    store, clocks = MemoryLease(), Clocks()
    changes: list[tuple[bool, str | None]] = []
    a = _elector(store, "a", clocks)
    a.on_change = lambda leader, holder: changes.append((leader, holder))
    assert a.try_acquire_or_renew()
    store.fail = True
    clocks.advance(2)
    assert a.try_acquire_or_renew()  # still within the deadline
    clocks.advance(1.5)
    assert not a.try_acquire_or_renew()
    assert changes == [(True, "a"), (False, "a")]


def test_release_lets_the_other_take_over_at_once() -> None:
    store, clocks = MemoryLease(), Clocks()
    a, b = _elector(store, "a", clocks), _elector(store, "b", clocks)
    assert a.try_acquire_or_renew()
    a.release()
    assert not a.is_leader()
    assert store.lease is not None and store.lease.holder == ""
    assert store.lease.duration_seconds == 1
    assert b.try_acquire_or_renew()


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    top = Backoff(2, 60, rand=lambda: 0.0)
    assert [top.after(False) for _ in range(7)] == [2, 4, 8, 16, 32, 60, 60]
    assert top.after(True) is None and top.failures == 0
    assert top.after(False) == 2
    low = Backoff(2, 60, jitter=0.2, rand=lambda: 1.0)
    assert [low.after(False) for _ in range(3)] == pytest.approx([1.6, 3.2, 6.4])
