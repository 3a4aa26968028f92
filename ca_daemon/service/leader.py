"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection.

One Lease, ``leader_election.lease`` in the daemon's namespace. A candidate takes it
when it is absent, released (empty holder) or expired, incrementing ``leaseTransitions``
on a takeover; the holder renews it every ``retry_period``. Every write carries the
resourceVersion it read, so of two candidates one wins and the other gets a 409.

Expiry is judged on this process's monotonic clock only, never on the times in the
Lease (another host wrote them, and its clock may be off by any amount): a candidate
remembers the record it last read and when, locally, that record last changed; another
holder's Lease has expired once it stayed unchanged for ``lease_duration`` of our time.
A process that has just started therefore waits a whole ``lease_duration`` before it
takes over a Lease it finds held, as client-go does.

A leader stops leading as soon as it reads the Lease held by someone else, and
otherwise when it could not renew within ``renew_deadline``: ``is_leader`` is judged on
the monotonic clock at the moment it is asked, so a process paused past its lease
(SIGSTOP) does not act on its first breath after resuming. On SIGTERM the holder
releases the Lease (empty holder, 1s duration: client-go's ReleaseOnCancel) so a
standby takes over at its next retry rather than after a whole lease.

``decide`` is the pure part: what to write and what to remember, given the Lease read,
what was remembered of earlier reads, the local time and who we are.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from ca_daemon.config.settings import Settings
from ca_daemon.errors import KubeError
from ca_daemon.util.kube import api_client, api_message, describe

log = logging.getLogger(__name__)

_GROUP_VERSION = "coordination.k8s.io/v1"


def new_identity() -> str:
    """The Pod's name and a random suffix: two processes never share one.

    ``POD_NAME`` first (the chart sets it from the downward API): on the host network
    ``HOSTNAME`` is the node's name, the same for every replica on it, and the Lease's
    holder would not say which Pod leads."""
    name = (
        os.environ.get("POD_NAME")
        or os.environ.get("HOSTNAME")
        or socket.gethostname()
        or "ca-daemon"
    )
    return f"{name}_{secrets.token_hex(4)}"


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease's spec, and the resourceVersion it was read at (None: not stored yet)."""

    holder: str
    duration_seconds: int
    acquire_time: datetime | None
    renew_time: datetime | None
    transitions: int = 0
    resource_version: str | None = None


@dataclass(frozen=True)
class Observed:
    """A Lease as last read, and ``at``: the local monotonic time it was first read so."""

    record: LeaseRecord
    at: float


def observe(last: Observed | None, current: LeaseRecord, now: float) -> Observed:
    """``last`` while the record is the same; a changed one is observed afresh at ``now``.

    Every write changes the resourceVersion (and a renewal the renewTime), so a holder
    that keeps renewing keeps resetting the observation, however wrong its clock is.
    """
    if last is not None and last.record == current:
        return last
    return Observed(current, now)


@dataclass(frozen=True)
class Decision:
    """``create`` or ``update`` ``lease`` (ours afterwards), or ``wait``: ``lease`` is held
    by someone else. ``observed``: what to remember of this read (None: no Lease)."""

    action: Literal["create", "update", "wait"]
    lease: LeaseRecord | None
    observed: Observed | None = None


def decide(
    current: LeaseRecord | None,
    observed: Observed | None,
    now: float,
    wall: datetime,
    identity: str,
    duration: timedelta,
) -> Decision:
    """What a candidate ``identity`` writes, having read ``current`` at local monotonic
    time ``now``, ``observed`` being what it remembered from its earlier reads.

    ``wall`` only goes into the record (acquireTime/renewTime, for people reading the
    Lease); no decision depends on it. Another holder's Lease is expired once the
    record stayed unchanged for our own ``duration``, as client-go judges it.
    """
    seconds = max(1, int(duration.total_seconds()))
    if current is None:
        return Decision("create", LeaseRecord(identity, seconds, wall, wall, 0))
    seen = observe(observed, current, now)
    if current.holder == identity:
        renewed = replace(current, duration_seconds=seconds, renew_time=wall)
        return Decision("update", renewed, seen)
    if current.holder and now <= seen.at + duration.total_seconds():
        return Decision("wait", current, seen)
    taken = replace(
        current,
        holder=identity,
        duration_seconds=seconds,
        acquire_time=wall,
        renew_time=wall,
        transitions=current.transitions + 1,
    )
    return Decision("update", taken, seen)


def released(current: LeaseRecord, now: datetime) -> LeaseRecord:
    """What the holder writes when it gives the Lease up (client-go's ReleaseOnCancel)."""
    return replace(current, holder="", duration_seconds=1, acquire_time=now, renew_time=now)


# --- the Lease on the API server ----------------------------------------------------------


def _micro(at: datetime | None) -> str | None:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if at else None


def _body(name: str, namespace: str, lease: LeaseRecord) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if lease.resource_version is not None:
        metadata["resourceVersion"] = lease.resource_version
    return {
        "apiVersion": _GROUP_VERSION,
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": lease.holder,
            "leaseDurationSeconds": lease.duration_seconds,
            "acquireTime": _micro(lease.acquire_time),
            "renewTime": _micro(lease.renew_time),
            "leaseTransitions": lease.transitions,
        },
    }


def _record(obj: Any) -> LeaseRecord:
    spec = obj.spec
    return LeaseRecord(
        holder=spec.holder_identity or "",
        duration_seconds=spec.lease_duration_seconds or 0,
        acquire_time=spec.acquire_time,
        renew_time=spec.renew_time,
        transitions=spec.lease_transitions or 0,
        resource_version=obj.metadata.resource_version,
    )


class LostRace(KubeError):
    """Another candidate wrote the Lease first (409 Conflict / 409 AlreadyExists)."""


# Below this a healthy API server's answer may not make it in time.
MIN_REQUEST_TIMEOUT = 0.5


def request_timeout(renew_deadline: timedelta) -> float:
    """The bound on one Lease request, connecting included: a third of the renew deadline,
    so a round (a read, then a write) ends with a third of it to spare even when the API
    server does not answer, and a leader cut off from it knows before its deadline."""
    return max(MIN_REQUEST_TIMEOUT, renew_deadline.total_seconds() / 3)


class LeaseStore:
    """Reads and writes one Lease, each request bounded by ``timeout`` seconds in all.

    ``api`` should make no retries of its own (``api_client(retries=False)``): urllib3's
    default tries a connection four times, each with the whole timeout."""

    def __init__(self, api: Any, namespace: str, name: str, timeout: float) -> None:
        from kubernetes import client

        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.timeout = timeout  # a number: urllib3's total, connect and read together
        self.description = f"Lease {namespace}/{name}"

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 409:
                raise LostRace(f"{what}: {api_message(exc)}") from None
            if exc.status == 404 and what.startswith("read"):
                return None
            raise describe(exc, what) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise describe(exc, what) from None

    def read(self) -> LeaseRecord | None:
        found = self._call(
            f"read {self.description}",
            self.coordination.read_namespaced_lease,
            self.name,
            self.namespace,
        )
        return None if found is None else _record(found)

    def write(self, action: Literal["create", "update"], lease: LeaseRecord) -> LeaseRecord:
        body = _body(self.name, self.namespace, lease)
        if action == "create":
            stored = self._call(
                f"create {self.description}",
                self.coordination.create_namespaced_lease,
                self.namespace,
                body,
            )
        else:
            stored = self._call(
                f"update {self.description}",
                self.coordination.replace_namespaced_lease,
                self.name,
                self.namespace,
                body,
            )
        return _record(stored)


# --- the elector ------------------------------------------------------------------------


Monotonic = Callable[[], float]
Wall = Callable[[], datetime]


class LeaderElector:
    """Tries to acquire or renew the Lease every ``retry_period`` in a thread of its own.

    ``on_change(leader, holder)`` is called when this process starts or stops leading,
    or the holder it sees changes.
    """

    def __init__(
        self,
        store: LeaseStore,
        identity: str,
        lease_duration: timedelta,
        renew_deadline: timedelta,
        retry_period: timedelta,
        *,
        on_change: Callable[[bool, str | None], None] = lambda leader, holder: None,
        monotonic: Monotonic = time.monotonic,
        wall: Wall = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline.total_seconds()
        self.retry_period = retry_period.total_seconds()
        self.on_change = on_change
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._renewed_at: float | None = None  # monotonic time of the last renewal we won
        self._holder: str | None = None  # the holder last seen
        self._observed: Observed | None = None  # the Lease last read (the thread's own)
        self._lease: LeaseRecord | None = None  # ours, as last written
        self._reported: tuple[bool, str | None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what the rest of the daemon asks ---------------------------------------------

    def is_leader(self) -> bool:
        with self._lock:
            return self._leading_locked()

    def _leading_locked(self) -> bool:
        if self._renewed_at is None:
            return False
        return self._monotonic() - self._renewed_at < self.renew_deadline

    def holder(self) -> str | None:
        """Who holds the Lease, as last read (our own identity when we do)."""
        with self._lock:
            return self.identity if self._leading_locked() else self._holder

    # --- one round ----------------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """Read the Lease and take or renew it if we may; True when we lead afterwards."""
        try:
            current = self.store.read()
            # Between the read and any write: another's record is seen no earlier than it
            # was written, and our own renewal counts from before anyone else can see it.
            now = self._monotonic()
            decision = decide(
                current, self._observed, now, self._wall(), self.identity, self.lease_duration
            )
            self._observed = decision.observed
            assert decision.lease is not None
            if decision.action == "wait":
                with self._lock:
                    # Held by someone else: we stop leading now, not at renew_deadline.
                    self._renewed_at = None
                    self._holder = decision.lease.holder
            else:
                stored = self.store.write(decision.action, decision.lease)
                self._observed = Observed(stored, now)
                with self._lock:
                    self._renewed_at = now
                    self._holder = self.identity
                    self._lease = stored
                if current is None or current.holder != self.identity:
                    log.info(
                        "acquired %s as %s (transitions %d)",
                        self.store.description,
                        self.identity,
                        stored.transitions,
                    )
        except LostRace as exc:
            log.info("%s: another candidate won: %s", self.store.description, exc)
        except KubeError as exc:
            log.warning("leader election: %s", exc)
        self._report()
        return self.is_leader()

    def _report(self) -> None:
        with self._lock:
            leading = self._leading_locked()
            now = (leading, self.identity if leading else self._holder)
            if now == self._reported:
                return
            was_leading = self._reported is not None and self._reported[0]
            self._reported = now
        if was_leading and not leading and now[1] not in (None, self.identity):
            log.warning(
                "lost leadership of %s: it is held by %s; standing by",
                self.store.description,
                now[1],
            )
        elif was_leading and not leading:
            log.warning(
                "lost leadership of %s (not renewed within %.0fs); standing by",
                self.store.description,
                self.renew_deadline,
            )
        elif not leading:
            log.info("standing by; the leader is %s", now[1] or "nobody yet")
        self.on_change(*now)

    def release(self) -> None:
        """Give the Lease up if we hold it (on SIGTERM), so a standby need not wait."""
        with self._lock:
            lease, leading = self._lease, self._leading_locked()
            self._renewed_at = None
        if lease is None or not leading:
            return
        try:
            self.store.write("update", released(lease, self._wall()))
            log.info("released %s", self.store.description)
        except KubeError as exc:
            log.warning("could not release %s: %s", self.store.description, exc)
        self._report()

    # --- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self.try_acquire_or_renew()
            self._stop.wait(self.retry_period)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.renew_deadline + 5)
        if release:
            self.release()


def build_elector(
    settings: Settings,
    on_change: Callable[[bool, str | None], None],
    api: Any | None = None,
) -> LeaderElector:
    le = settings.leader_election
    store = LeaseStore(
        api if api is not None else api_client(retries=False),
        settings.daemon_namespace,
        le.lease,
        timeout=request_timeout(le.renew_deadline),
    )
    return LeaderElector(
        store,
        new_identity(),
        le.lease_duration,
        le.renew_deadline,
        le.retry_period,
        on_change=on_change,
    )
