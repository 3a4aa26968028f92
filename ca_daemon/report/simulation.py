"""Running the real engine forward on a simulated clock, from event to event: each pass
at the earliest time anything can happen (report/forecast.py says how and why)."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from ca_daemon.config.settings import LinkerdConfig, Settings
from ca_daemon.model.state import (
    KONG_PREFIX,
    LINKERD_ISSUER,
    Phase,
    State,
    client_key,
    issuer_cluster,
    issuer_key,
)
from ca_daemon.pki.bundle import fingerprint
from ca_daemon.pki.profiles import Kind
from ca_daemon.report.simulated import (
    ConfirmingPublisher,
    CurrentRollout,
    MemoryJournal,
    SimulatedAnchor,
    simulated_issue,
)
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.plan import Observations, plan, renew_at, root_due_at
from ca_daemon.rotation.results import PassResult, step_target_name
from ca_daemon.rotation.steps import Activate, Wait

# A year of a Linkerd issuer renewed every 32h and thousands of jittered clients is
# well under this; reaching it is said, never silently cut.
MAX_PASSES = 10_000
# What `ca-daemon plan` groups dates that are not exact anyway by (see simulate()).
DEFAULT_RESOLUTION = timedelta(hours=1)

_ENGINE_LOGGER = "ca_daemon.rotation.engine"


@dataclass(frozen=True)
class Event:
    """One step the daemon will take: when, on what, and why."""

    at: datetime
    kind: str  # trust-anchor | linkerd-issuer | kong-intermediate | kong-client
    name: str
    action: str  # the plan step: IssueKongClient, PrepareRoot, Activate, ...
    reason: str
    # False: the date depends on a certificate not issued yet (its jitter is unknown).
    exact: bool = True
    error: str | None = None  # the simulated step failed (a configuration problem)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat().replace("+00:00", "Z"),
            "kind": self.kind,
            "name": self.name,
            "action": self.action,
            "reason": self.reason,
            "exact": self.exact,
            **({"error": self.error} if self.error else {}),
        }


@dataclass
class Forecast:
    events: list[Event] = field(default_factory=list)
    passes: int = 0
    # The pass cap was reached before ``until``: events after ``stopped_at`` are missing.
    truncated: bool = False
    stopped_at: datetime | None = None
    errors: list[str] = field(default_factory=list)


# --- the in-memory journal ---------------------------------------------------------------


def ceil_second(at: datetime) -> datetime:
    whole = at.replace(microsecond=0)
    return whole if whole == at else whole + timedelta(seconds=1)


def _with_clients(settings: Settings, names: Iterable[str] | None) -> Settings:
    """``settings`` configuring only the Kong clients ``names`` (None: all)."""
    if names is None:
        return settings
    wanted = set(names)
    clients = [c for c in settings.kong.clients if c.name in wanted]
    return settings.model_copy(
        update={"kong": settings.kong.model_copy(update={"clients": clients})}
    )


@contextmanager
def _quiet_engine() -> Iterator[None]:
    """The engine logs every step at INFO; in a forecast those are the output, not news."""
    logger = logging.getLogger(_ENGINE_LOGGER)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# Phases in which plan() decides each credential on its own record, its signer and its
# settings alone, so a pass may load just the credentials due (see _Simulation).
_NARROW_PHASES = (Phase.STEADY, Phase.RETIRING)


class _Simulation:
    """The clock, moved from one event to the next, and the passes run at each.

    A year of thousands of clients is tens of thousands of passes (every client's
    renewal falls on a second of its own, spread by the jitter), and ``plan()`` looks at
    every credential it is given. So between CA events a pass loads only the
    credentials due at that second: with the root steady (or retiring) and no manual
    operation open, ``plan()`` decides each credential from its own record, its signer
    and its own settings, and the root rotation's steps from the CA record alone, so
    the steps are the same as over the whole state. Every other pass (the first one,
    any CA event, a root rotation in progress, an open operation) loads everything.
    """

    def __init__(self, state: State, settings: Settings) -> None:
        # Signing in memory is CPU work: threads would only contend for the GIL.
        # Concurrency decides nothing, so the steps are the same.
        rotation = settings.rotation.model_copy(update={"concurrency": 1})
        settings = settings.model_copy(update={"rotation": rotation})
        self.settings = settings
        self.anchor = SimulatedAnchor()
        self.journal = MemoryJournal(state)
        self.rollout = (
            CurrentRollout() if settings.kubernetes_enabled and settings.linkerd.enabled else None
        )
        self.jitter = settings.rotation.jitter
        self.bare = _with_clients(settings, ())
        everywhere = settings.kong_clients_everywhere
        self._before = {client_key(c.name): c.rotate_before for c in everywhere}
        # Read by every narrow pass too: a linked cluster's credentials are not narrowed.
        self._linked = [issuer_key(c.name) for c in settings.linked_clusters] + [
            client_key(c.name) for c in everywhere if "/" in c.name
        ]
        self.exact_passes: dict[datetime, bool] = {}
        self.retire_exact = True
        # Credential renewals: (due, not exact, key, fingerprint); stale ones are skipped.
        self._heap: list[tuple[datetime, bool, str, str]] = []
        self.rebuild()

    # --- what is due when ---------------------------------------------------------------

    def due_exact(self, cert: x509.Certificate) -> bool:
        """Whether ``renew_at(cert)`` is known: its end is, and its jitter is (it is real)."""
        return self.anchor.end_exact(cert) and (self.jitter == 0 or not self.anchor.simulated(cert))

    def _issuer_of(self, key: str) -> LinkerdConfig | None:
        """The Linkerd settings of the cluster whose issuer ``key`` is (None: no issuer)."""
        if key == LINKERD_ISSUER:
            return self.settings.linkerd
        cluster = issuer_cluster(key)
        if cluster is None or cluster not in {c.name for c in self.settings.linked_clusters}:
            return None
        return self.settings.linkerd_of(cluster)

    def _rotate_before(self, key: str) -> timedelta | None:
        linkerd = self._issuer_of(key)
        if linkerd is not None:
            on = self.settings.linkerd.enabled and linkerd.enabled
            return linkerd.issuer.rotate_before if on else None
        if issuer_cluster(key) is not None:
            return None  # a cluster no longer configured
        return self._before.get(key) if self.settings.kong.enabled else None

    def lifetime(self, key: str) -> timedelta:
        linkerd = self._issuer_of(key)
        if linkerd is not None:
            return linkerd.issuer.lifetime
        name = key.removeprefix(KONG_PREFIX)
        # A client no longer configured is dropped; the longest lifetime bounds it.
        lifetimes = {c.name: c.lifetime for c in self.settings.kong_clients_everywhere}
        return lifetimes.get(name, max(lifetimes.values(), default=timedelta(0)))

    def push(self, key: str) -> None:
        entry = self.journal.entry(key)
        before = self._rotate_before(key)
        if entry is None or before is None:
            return
        at = ceil_second(renew_at(entry.cert, before, self.jitter))
        heapq.heappush(
            self._heap, (at, not self.due_exact(entry.cert), key, fingerprint(entry.cert))
        )

    def rebuild(self) -> None:
        self._heap = []
        for key in list(self.journal.state.credentials()):
            self.push(key[0])

    def _current(self, item: tuple[datetime, bool, str, str]) -> bool:
        entry = self.journal.entry(item[2])
        return entry is not None and fingerprint(entry.cert) == item[3]

    def next_renewal(self, now: datetime) -> tuple[datetime, bool] | None:
        """The earliest credential renewal after ``now``; entries due already (capped at
        their signer's end, so left alone) or for a replaced certificate are dropped."""
        while self._heap:
            item = self._heap[0]
            if item[0] > now and self._current(item):
                return item[0], not item[1]
            heapq.heappop(self._heap)
        return None

    def group_end(self, limit: datetime) -> datetime:
        """The latest inexact renewal due by ``limit`` with no exact one before it: one pass
        then renews them all (each date was only one possible date anyway)."""
        taken: list[tuple[datetime, bool, str, str]] = []
        end: datetime | None = None
        while self._heap and self._heap[0][0] <= limit:
            item = heapq.heappop(self._heap)
            taken.append(item)
            if not self._current(item):
                continue
            if not item[1]:  # an exact date: the group ends before it
                break
            end = item[0]
        for item in taken:
            heapq.heappush(self._heap, item)
        assert end is not None, "group_end() is asked only when an inexact renewal is next"
        return end

    def take_due(self, at: datetime) -> tuple[list[str], bool]:
        """The credentials due by ``at`` (taken off the queue) and whether all are exact."""
        keys, exact = [], True
        while self._heap and self._heap[0][0] <= at:
            item = heapq.heappop(self._heap)
            if self._current(item):
                keys.append(item[2])
                exact = exact and not item[1]
        return keys, exact

    def ca_times(self, now: datetime) -> Iterator[tuple[datetime, bool]]:
        """When the CA record itself has something to do: the root due, the Kong
        intermediate due, the end of a wait the root rotation names."""
        ca = self.journal.ca
        root = ca.active_root
        if root is not None and ca.phase is Phase.STEADY:
            yield root_due_at(root.cert, self.settings), self.anchor.end_exact(root.cert)
        inter = ca.active_intermediate
        if inter is not None and self.settings.kong.enabled:
            before = self.settings.kong.intermediate.rotate_before
            yield renew_at(inter.cert, before, self.jitter), self.due_exact(inter.cert)
        if ca.phase is Phase.STEADY or ca.active_root is None:
            return
        rotation = ca.rotation
        # Waits with an end depend on the CA record alone: no credential is needed.
        for step in plan(State(ca=ca), now, self.bare, Observations()):
            if isinstance(step, Wait) and step.until is not None:
                if ca.phase is Phase.RETIRING:
                    exact = self.retire_exact
                else:  # the propagation delay, counted from the confirmation
                    confirmed = rotation.confirmed_at if rotation else None
                    exact = self.exact_passes.get(confirmed, True) if confirmed else True
                yield step.until, exact

    # --- one pass --------------------------------------------------------------------------

    def narrow(self) -> bool:
        ca = self.journal.ca
        return ca.phase in _NARROW_PHASES and not any(op.open for op in ca.operations)

    def run(self, now: datetime, exact: bool, keys: list[str] | None) -> PassResult:
        """One pass at ``now``: over every credential (``keys`` None) or just ``keys``."""
        if keys is None:
            self.journal.view, settings = None, self.settings
        else:
            view = {LINKERD_ISSUER, *self._linked, *keys}
            self.journal.view = frozenset(view)
            settings = _with_clients(self.settings, (k.removeprefix(KONG_PREFIX) for k in keys))
        engine = Engine(
            settings,
            self.anchor,
            self.journal,
            [ConfirmingPublisher()],
            clock=lambda: now,
            rollout=self.rollout,
            issue=simulated_issue,
        )
        self.anchor.pass_exact = exact
        self.exact_passes[now] = exact
        try:
            return engine.reconcile(now=now)
        finally:
            self.journal.view = None


def simulate(
    state: State,
    settings: Settings,
    start: datetime,
    until: datetime,
    max_passes: int = MAX_PASSES,
    *,
    resolution: timedelta = timedelta(0),
    narrow: bool = True,
    stop: Callable[[Event], bool] | None = None,
) -> Forecast:
    """Run the real engine forward from ``start`` to ``until`` over a copy of ``state``.

    ``resolution``: renewals whose date is not exact anyway (see the module) that fall
    within it are renewed in one pass at the latest of them, so thousands of jittered
    clients take hundreds of passes a year, not tens of thousands; exact dates are
    never moved. ``narrow=False`` loads every credential in every pass (slow with many
    clients; the tests compare both). ``stop``: the pass that records an event it
    accepts is the last one.
    """
    sim = _Simulation(state, settings)
    result = Forecast()
    now, exact, full = start, True, True
    with _quiet_engine():
        while now <= until:
            if result.passes >= max_passes:
                result.truncated, result.stopped_at = True, now
                break
            if full or not narrow or not sim.narrow():
                before = sim.journal.state
                done = sim.run(now, exact, None)
            else:
                keys, keys_exact = sim.take_due(now)
                exact = exact and keys_exact
                before = State()
                done = sim.run(now, exact, keys)
            result.passes += 1
            recorded = len(result.events)
            _record(result, done, now, exact, before, sim)
            if stop is not None and any(stop(e) for e in result.events[recorded:]):
                break
            if full or not narrow or not sim.narrow() or done.errors:
                sim.rebuild()
            else:
                for step in done.steps:
                    key = step_target_name(step)
                    if step.kind in (Kind.LINKERD_ISSUER, Kind.KONG_CLIENT) and key:
                        sim.push(key)
            found = _next(sim, now, done, settings, resolution)
            if found is None:
                break
            now, exact, full = found
    return result


def _next(
    sim: _Simulation, now: datetime, done: PassResult, settings: Settings, resolution: timedelta
) -> tuple[datetime, bool, bool] | None:
    """(when, exact, a pass over everything) of the next pass; None: nothing ever again."""
    ca = [
        (at, exact) for at, exact in ((ceil_second(t), e) for t, e in sim.ca_times(now)) if at > now
    ]
    renewal = sim.next_renewal(now)
    if done.errors:  # the daemon tries again at its next check
        ca.append((now + settings.rotation.check_interval, False))
    times = [at for at, _ in ca] + ([renewal[0]] if renewal else [])
    if not times:
        return None
    at = min(times)
    exact = all(e for t, e in ca if t == at) and (renewal is None or renewal[0] != at or renewal[1])
    full = any(t == at for t, _ in ca)
    if renewal is not None and renewal[0] == at and not exact and not full and resolution:
        limit = min([at + resolution, *(t - timedelta(seconds=1) for t, _ in ca)])
        at = sim.group_end(limit)
    return at, exact, full


def _record(
    result: Forecast,
    done: PassResult,
    now: datetime,
    exact: bool,
    before: State,
    sim: _Simulation,
) -> None:
    for step in done.steps:
        result.events.append(
            Event(now, step.kind.value, step.name, step.action, step.reason, exact, step.error)
        )
        if isinstance(step.step, Activate) and step.ok:
            auto = sim.settings.rotation.retire_delay == "auto"
            sim.retire_exact = exact and (not auto or _old_chain_end_exact(before, now, sim))
    result.errors += [f"{now.isoformat()}: {e}" for e in done.errors]


def _old_chain_end_exact(before: State, now: datetime, sim: _Simulation) -> bool:
    """Whether the latest not-after under the old chain at activation (what retirement
    waits for) is known: the latest of the exact ones is, and no other can be later
    even if issued as late as ``now``."""
    known: list[datetime] = []
    bound: list[datetime] = []
    for key, entry in before.credentials():
        if sim.anchor.end_exact(entry.cert):
            known.append(entry.cert.not_valid_after_utc)
        else:
            bound.append(now + sim.lifetime(key))
    return not bound or (bool(known) and max(known) >= max(bound))
