"""Leader election's decisions (acquire, renew, take over, wait) as client-go makes them,
and the elector's view of leadership on the monotonic clock, against an in-memory Lease."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest

from ca_daemon.daemon import Backoff
from ca_daemon.errors import KubeError
from ca_daemon.service.leader import (
    LeaderElector,
    LeaseRecord,
    LostRace,
    Observed,
    decide,
    new_identity,
    observe,
    released,
)

pytestmark = pytest.mark.usefixtures("clean_env")

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
DURATION = timedelta(seconds=15)
T = 5000.0  # the local monotonic clock, in seconds


def _held(holder: str, renewed: datetime, transitions: int = 3, rv: str = "41") -> LeaseRecord:
    return LeaseRecord(holder, 15, NOW - timedelta(hours=1), renewed, transitions, rv)


def _at(
    now: float, current: LeaseRecord | None, observed: Observed | None = None
) -> tuple[str, Observed | None]:
    """decide() for "me" at local time ``now`` (the wall clock fixed at NOW)."""
    d = decide(current, observed, now, NOW, "me", DURATION)
    return d.action, d.observed


def test_an_absent_lease_is_created_ours() -> None:
    d = decide(None, None, T, NOW, "me", DURATION)
    assert d.action == "create"
    assert d.lease == LeaseRecord("me", 15, NOW, NOW, 0, None)


def test_our_lease_is_renewed_keeping_acquire_time_and_transitions() -> None:
    current = _held("me", NOW - timedelta(seconds=2))
    d = decide(current, None, T, NOW, "me", DURATION)
    assert d.action == "update"
    assert d.lease == replace(current, renew_time=NOW)
    assert d.lease is not None and d.lease.resource_version == "41"  # optimistic concurrency


def test_another_holders_lease_expires_a_lease_duration_after_we_saw_it_change() -> None:
    current = _held("other", NOW)
    action, seen = _at(T, current)  # first seen now: a whole lease to wait
    assert action == "wait" and seen == Observed(current, T)
    action, later = _at(T + 15, current, seen)  # exactly at its end: still held
    assert action == "wait" and later == seen
    d = decide(current, seen, T + 15.5, NOW, "me", DURATION)
    assert d.action == "update"
    assert d.lease == LeaseRecord("me", 15, NOW, NOW, 4, "41")


@pytest.mark.parametrize(
    "renewed",
    [NOW - timedelta(days=365), NOW + timedelta(days=365)],
    ids=["far-past", "far-future"],
)
def test_the_holders_clock_does_not_matter_only_whether_the_record_changes(
    renewed: datetime,
) -> None:
    """Its renewTime a year off either way: while it keeps renewing it stays the
    holder's, and once it stops it is taken over a lease_duration later, not sooner."""
    current, seen = _held("other", renewed), None
    now = T
    for n in range(10):  # renewing every 10s, with its skewed clock
        current = _held("other", renewed + timedelta(seconds=10 * n), rv=str(100 + n))
        action, seen = _at(now, current, seen)
        assert action == "wait", n
        now += 10
    assert seen == Observed(current, now - 10)
    # It stops renewing: held for a lease_duration from when we saw its last renewal.
    assert _at(now - 10 + 15, current, seen)[0] == "wait"
    assert _at(now - 10 + 15.1, current, seen)[0] == "update"


def test_a_changed_record_resets_the_observation() -> None:
    first = _held("other", NOW)
    seen = observe(None, first, T)
    assert observe(seen, first, T + 14) is seen  # the same record: the first sighting counts
    # Renewed (new resourceVersion), even with the very same renewTime: seen afresh.
    renewed = replace(first, resource_version="42")
    assert observe(seen, renewed, T + 14) == Observed(renewed, T + 14)
    assert _at(T + 20, renewed, seen)[0] == "wait"  # 20s after the first, 6s after the change
    assert _at(T + 20, first, seen)[0] == "update"  # unchanged for 20s: expired
    # Another holder: a new record too.
    other = replace(first, holder="third")
    assert _at(T + 20, other, seen) == ("wait", Observed(other, T + 20))


def test_a_released_lease_is_taken_over_at_once() -> None:
    d = decide(_held("", NOW - timedelta(seconds=1)), None, T, NOW, "me", DURATION)
    assert d.action == "update"
    assert d.lease == LeaseRecord("me", 15, NOW, NOW, 4, "41")


def test_release_empties_the_holder_with_a_one_second_lease() -> None:
    r = released(_held("me", NOW), NOW)
    assert (r.holder, r.duration_seconds, r.transitions) == ("", 1, 3)
    assert decide(r, None, T, NOW, "other", DURATION).action == "update"


def test_identities_are_the_hostname_and_a_random_suffix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.setenv("HOSTNAME", "ca-daemon-7d9f")
    a, b = new_identity(), new_identity()
    assert a.startswith("ca-daemon-7d9f_") and b.startswith("ca-daemon-7d9f_") and a != b


def test_the_pod_name_comes_before_the_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the host network HOSTNAME is the node's name, the same for both replicas; the
    chart's POD_NAME (downward API) says which Pod holds the Lease."""
    monkeypatch.setenv("HOSTNAME", "node-1")
    monkeypatch.setenv("POD_NAME", "ca-daemon-7d9f-x2k4q")
    assert new_identity().startswith("ca-daemon-7d9f-x2k4q_")
    monkeypatch.setenv("POD_NAME", "")  # unset by the downward API: the hostname again
    assert new_identity().startswith("node-1_")


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


def test_a_leader_that_reads_the_lease_held_by_another_stops_leading_at_once() -> None:
    store, clocks = MemoryLease(), Clocks()
    changes: list[tuple[bool, str | None]] = []
    a = _elector(store, "a", clocks)
    a.on_change = lambda leader, holder: changes.append((leader, holder))
    assert a.try_acquire_or_renew()
    assert store.lease is not None
    # Someone else wrote the Lease (a's writes were delayed, an operator edited it...).
    store.lease = replace(store.lease, holder="b", resource_version="99")
    clocks.advance(0.5)  # well within a's renew deadline
    writes = len(store.writes)
    assert not a.try_acquire_or_renew()
    assert not a.is_leader() and a.holder() == "b"
    assert changes == [(True, "a"), (False, "b")]
    assert len(store.writes) == writes  # and it leaves b's Lease alone


def test_a_fresh_candidate_waits_a_whole_lease_for_a_holder_it_never_saw_renew() -> None:
    """It cannot tell how old the record is from the holder's renewTime, only from its
    own observation, so it waits lease_duration from its first read."""
    store, clocks = MemoryLease(), Clocks()
    stale = LeaseRecord("gone", 4, NOW - timedelta(days=1), NOW - timedelta(days=1), 7, None)
    store.write("create", stale)
    b = _elector(store, "b", clocks)
    assert not b.try_acquire_or_renew()
    clocks.advance(4)
    assert not b.try_acquire_or_renew()
    clocks.advance(0.5)
    assert b.try_acquire_or_renew()
    assert store.lease is not None and store.lease.holder == "b"
    assert store.lease.transitions == 8


def test_a_write_from_a_stale_read_loses_the_race() -> None:
    store, clocks = MemoryLease(), Clocks()
    a, b = _elector(store, "a", clocks), _elector(store, "b", clocks)
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    stale = store.lease
    clocks.advance(10)  # b saw it 10s ago, unchanged since: expired
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
