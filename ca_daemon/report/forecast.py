"""The forecast (`ca-daemon plan`): every renewal and root-rotation phase, with its date.

Nothing here decides anything. The real :class:`~ca_daemon.rotation.engine.Engine`,
with the real ``plan()``, is run forward on a simulated clock over a copy of the
journal, so the forecast cannot drift from what the daemon does. Only its
surroundings are simulated, in memory:

- the journal (:class:`MemoryJournal`): the state as objects, with check-and-set
  versions as the real one has, and no serialization;
- the anchor (:class:`SimulatedAnchor`): signs with throwaway keys, honouring the
  requested validity exactly (the dates are what matter);
- one publisher that always confirms, and (when the daemon would roll Linkerd) a
  rollout that restarts at once and reports every Pod current.

So the dates are the *earliest possible* ones: the daemon acts at its first check at
or after each date (up to ``rotation.check_interval`` later), a publisher that
confirms late moves the propagation clock, lagging Pods hold back activation.

The clock moves from event to event, never by fixed steps: after each pass the next
time anything can happen is the earliest of every certificate's ``renew_at`` (with
its ``rotate_before`` and jitter), the active root's due time and any ``Wait.until``
the planner returns, rounded up to the second, so everything due in the same second
is one pass.

A certificate the forecast itself issues has a throwaway key, and the renewal jitter
comes from the certificate's fingerprint: its renewal date is one possible date
within the jitter window, not *the* date. Such dates (and everything that follows
from them) are marked not ``exact``; dates that follow only from certificates in the
journal, and from fixed delays, are exact.

The journal is only read (:func:`load_state`): for the local anchor the records are
read from their files (the passphrase is neither needed nor created: keys stay sealed,
they are never used); for Vault from KV, read-only. No state at all forecasts the
bootstrap at ``start``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca_daemon.anchor.base import CA
from ca_daemon.config.settings import Settings
from ca_daemon.errors import AnchorError, JournalConflict, JournalError
from ca_daemon.journal.format import CA_KEY, LEGACY_CREDENTIALS, SHARD_FOLDER
from ca_daemon.journal.journal import Journal, Versioned
from ca_daemon.journal.store.records import FileRecordStore, Record, RecordConflict
from ca_daemon.model.state import (
    KONG_PREFIX,
    LINKERD_ISSUER,
    CaRecord,
    IssuedEntry,
    Phase,
    State,
    client_key,
)
from ca_daemon.model.world import TrustWorld
from ca_daemon.pki.bundle import fingerprint
from ca_daemon.pki.keys import KeyType, PrivateKey, PublicKey, generate_key
from ca_daemon.pki.profiles import Kind, Subject, Validity, sign_certificate
from ca_daemon.publish.base import PublishReport
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.plan import Observations, plan, renew_at, root_due_at
from ca_daemon.rotation.results import PassResult
from ca_daemon.rotation.steps import Activate, Wait
from ca_daemon.util.durations import format_duration, parse_duration

EXIT_OK, EXIT_USAGE = 0, 2
DEFAULT_UNTIL = timedelta(hours=8760)
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


class _NoStore:
    """The RecordStore a MemoryJournal never uses (it keeps objects, not records)."""

    description = "forecast (in memory)"

    def read(self, key: str) -> tuple[Record, int] | None:
        raise AssertionError("MemoryJournal keeps its state as objects")

    def write(self, key: str, record: Record, version: int) -> int:
        raise AssertionError("MemoryJournal keeps its state as objects")

    def delete(self, key: str) -> None:
        raise AssertionError("MemoryJournal keeps its state as objects")

    def list(self, folder: str) -> list[str]:
        raise AssertionError("MemoryJournal keeps its state as objects")


class MemoryJournal(Journal):
    """The journal's contract (per-record versions, check-and-set) over objects in memory.

    ``view`` narrows what a pass loads to some credentials (None: all of them); saving
    reaches the whole state either way.
    """

    def __init__(self, state: State) -> None:
        super().__init__(_NoStore())
        self._ca = state.ca
        self._ca_version = 1 if state.ca != CaRecord() else 0
        self._credentials: dict[str, tuple[IssuedEntry, int]] = {
            key: (entry, 1) for key, entry in state.credentials()
        }
        self.view: frozenset[str] | None = None

    @property
    def ca(self) -> CaRecord:
        return self._ca

    def entry(self, key: str) -> IssuedEntry | None:
        found = self._credentials.get(key)
        return found[0] if found else None

    @property
    def state(self) -> State:
        """The whole state, whatever the view."""
        return self._state(self._credentials.items())

    def _state(self, items: Iterable[tuple[str, tuple[IssuedEntry, int]]]) -> State:
        return State.of(self._ca, ((key, entry) for key, (entry, _) in items))

    def load_ca(self, migrate: bool = True) -> tuple[CaRecord, int]:
        return self._ca, self._ca_version

    def load(self, migrate: bool = True) -> Versioned:
        if self.view is None:
            items = list(self._credentials.items())
        else:
            items = [(k, self._credentials[k]) for k in self.view if k in self._credentials]
        versions = {key: version for key, (_, version) in items}
        return Versioned(self._state(items), self._ca_version, versions)

    def save_ca(self, record: CaRecord, version: int) -> int:
        if version != self._ca_version:
            raise JournalConflict(f"CA record: version {self._ca_version}, expected {version}")
        self._ca, self._ca_version = record, version + 1
        return self._ca_version

    def save_credentials(
        self, shard: str, version: int, changes: Mapping[str, IssuedEntry | None]
    ) -> tuple[int, dict[str, int]]:
        # A forecast has one writer: shards need no check-and-set here.
        revisions: dict[str, int] = {}
        for key, entry in changes.items():
            current = self._credentials.get(key)
            if entry is None:
                self._credentials.pop(key, None)
                revisions[key] = 0
            else:
                revisions[key] = (current[1] if current else 0) + 1
                self._credentials[key] = (entry, revisions[key])
        return version + 1, revisions


# --- the simulated anchor, publisher and rollout -----------------------------------------


class SimulatedAnchor:
    """Signs in memory with throwaway keys; a CA from the journal gets a stand-in key.

    Signatures do not verify against the real CAs: only the dates matter. Each
    certificate it makes remembers whether its not-after is known exactly (it was
    issued at an exact time, or capped at a signer whose not-after is exact).
    """

    description = "forecast anchor (in memory)"

    def __init__(self) -> None:
        self._keys: dict[str, PrivateKey] = {}
        self._end_exact: dict[str, bool] = {}  # by fingerprint; absent: from the journal
        self.pass_exact = True  # set by the forecast before each pass

    def end_exact(self, cert: x509.Certificate) -> bool:
        return self._end_exact.get(fingerprint(cert), True)

    def simulated(self, cert: x509.Certificate) -> bool:
        return fingerprint(cert) in self._end_exact

    def _key(self, ref: str) -> PrivateKey:
        key = self._keys.get(ref)
        if key is None:
            key = self._keys[ref] = generate_key("ec-p256")
        return key

    def _made(
        self, cert: x509.Certificate, signer: x509.Certificate | None, validity: Validity
    ) -> x509.Certificate:
        capped = signer is not None and validity.not_after == signer.not_valid_after_utc
        exact = self.end_exact(signer) if capped and signer is not None else self.pass_exact
        self._end_exact[fingerprint(cert)] = exact
        return cert

    def check(self) -> None:
        pass

    def create_root(self, ref: str, subject: Subject, key_type: KeyType, validity: Validity) -> CA:
        key = self._keys[ref] = generate_key(key_type)
        cert = sign_certificate(Kind.TRUST_ANCHOR, subject, key.public_key(), key, None, validity)
        return CA(ref, self._made(cert, None, validity))

    def create_intermediate(self, ref: str, root: CA, subject: Subject, validity: Validity) -> CA:
        public = self._key(ref).public_key()
        cert = self._sign(Kind.KONG_INTERMEDIATE, subject, public, root, validity)
        return CA(ref, cert)

    def sign_ca(
        self, root: CA, csr: x509.CertificateSigningRequest, subject: Subject, validity: Validity
    ) -> x509.Certificate:
        return self._sign(Kind.LINKERD_ISSUER, subject, _public(csr), root, validity)

    def sign_client(
        self,
        intermediate: CA,
        csr: x509.CertificateSigningRequest,
        subject: Subject,
        validity: Validity,
    ) -> x509.Certificate:
        return self._sign(Kind.KONG_CLIENT, subject, _public(csr), intermediate, validity)

    def _sign(
        self, kind: Kind, subject: Subject, public: PublicKey, signer: CA, validity: Validity
    ) -> x509.Certificate:
        cert = sign_certificate(kind, subject, public, self._key(signer.ref), signer.cert, validity)
        return self._made(cert, signer.cert, validity)

    def set_default(self, root: CA, intermediate: CA | None) -> None:
        pass


def _public(csr: x509.CertificateSigningRequest) -> PublicKey:
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise AnchorError(f"unsupported CSR key type {type(key).__name__}")
    return key


class ConfirmingPublisher:
    """Publishes nowhere; confirms every bundle at once (the earliest propagation start)."""

    description = "forecast publisher (in memory, confirms at once)"

    def publish(self, world: TrustWorld) -> PublishReport:
        return PublishReport(self.description)


class CurrentRollout:
    """Restarts Linkerd at once and sees every meshed Pod on the current bundle."""

    description = "forecast rollout (every Pod current)"

    def restart(self, scope: Literal["control-plane", "all"], at: datetime) -> list[str]:
        return []

    def pending_pods(self, bundle_pem: str, confirmed_at: datetime) -> list[str]:
        return []

    def report_pending(self, pods: list[str], bundle_hash: str) -> None:
        pass


# --- moving the clock ------------------------------------------------------------------


def _ceil_second(at: datetime) -> datetime:
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
        self._before = {client_key(c.name): c.rotate_before for c in settings.kong.clients}
        self.exact_passes: dict[datetime, bool] = {}
        self.retire_exact = True
        # Credential renewals: (due, not exact, key, fingerprint); stale ones are skipped.
        self._heap: list[tuple[datetime, bool, str, str]] = []
        self.rebuild()

    # --- what is due when ---------------------------------------------------------------

    def due_exact(self, cert: x509.Certificate) -> bool:
        """Whether ``renew_at(cert)`` is known: its end is, and its jitter is (it is real)."""
        return self.anchor.end_exact(cert) and (self.jitter == 0 or not self.anchor.simulated(cert))

    def _rotate_before(self, key: str) -> timedelta | None:
        if key == LINKERD_ISSUER:
            return (
                self.settings.linkerd.issuer.rotate_before
                if self.settings.linkerd.enabled
                else None
            )
        return self._before.get(key) if self.settings.kong.enabled else None

    def lifetime(self, key: str) -> timedelta:
        if key == LINKERD_ISSUER:
            return self.settings.linkerd.issuer.lifetime
        name = key.removeprefix(KONG_PREFIX)
        # A client no longer configured is dropped; the longest lifetime bounds it.
        lifetimes = {c.name: c.lifetime for c in self.settings.kong.clients}
        return lifetimes.get(name, max(lifetimes.values(), default=timedelta(0)))

    def push(self, key: str) -> None:
        entry = self.journal.entry(key)
        before = self._rotate_before(key)
        if entry is None or before is None:
            return
        at = _ceil_second(renew_at(entry.cert, before, self.jitter))
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
            view = {LINKERD_ISSUER, *keys}
            self.journal.view = frozenset(view)
            settings = _with_clients(self.settings, (k.removeprefix(KONG_PREFIX) for k in keys))
        engine = Engine(
            settings,
            self.anchor,
            self.journal,
            [ConfirmingPublisher()],
            clock=lambda: now,
            rollout=self.rollout,
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
) -> Forecast:
    """Run the real engine forward from ``start`` to ``until`` over a copy of ``state``.

    ``resolution``: renewals whose date is not exact anyway (see the module) that fall
    within it are renewed in one pass at the latest of them, so thousands of jittered
    clients take hundreds of passes a year, not tens of thousands; exact dates are
    never moved. ``narrow=False`` loads every credential in every pass (slow with many
    clients; the tests compare both).
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
            _record(result, done, now, exact, before, sim)
            if full or not narrow or not sim.narrow() or done.errors:
                sim.rebuild()
            else:
                for step in done.steps:
                    if step.kind in (Kind.LINKERD_ISSUER, Kind.KONG_CLIENT):
                        key = (
                            LINKERD_ISSUER
                            if step.kind is Kind.LINKERD_ISSUER
                            else client_key(step.name)
                        )
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
        (at, exact)
        for at, exact in ((_ceil_second(t), e) for t, e in sim.ca_times(now))
        if at > now
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


def forecast(state: State, settings: Settings, start: datetime, until: datetime) -> list[Event]:
    """Every step the daemon will take from ``start`` to ``until``, each with its date."""
    return simulate(state, settings, start, until).events


# --- reading the journal, without writing ----------------------------------------------


class _CopiedStore:
    """Records copied out of the real store into memory; writes (an older layout is
    moved into shards on first load) stay here."""

    def __init__(self, description: str, records: Mapping[str, tuple[Record, int]]) -> None:
        self.description = description
        self._records = dict(records)

    def read(self, key: str) -> tuple[Record, int] | None:
        return self._records.get(key)

    def write(self, key: str, record: Record, version: int) -> int:
        stored = self._records.get(key)
        if (stored[1] if stored else 0) != version:
            raise RecordConflict(f"{key!r} changed")
        self._records[key] = (record, version + 1)
        return version + 1

    def delete(self, key: str) -> None:
        self._records.pop(key, None)

    def list(self, folder: str) -> list[str]:
        prefix = f"{folder}/"
        names = (k.removeprefix(prefix) for k in self._records if k.startswith(prefix))
        return sorted(n for n in names if "/" not in n)


def load_state(settings: Settings) -> State:
    """The current state, read only.

    Local anchor: the records are read from their files and their keys stay sealed (the
    forecast never uses them), so the passphrase is neither needed nor created, and
    thousands of keys are not decrypted for nothing; a data directory not created yet
    is no state. Vault: the journal as ``runtime`` opens it read-only, from KV.
    """
    if settings.anchor.backend != "local":
        # local import: start-up time, the Vault client (hvac) only when Vault is the anchor
        from ca_daemon.journal.open import build_anchor_and_journal

        return build_anchor_and_journal(settings, create=False)[1].load().state

    source = FileRecordStore(settings.anchor.local.dir)
    records: dict[str, tuple[Record, int]] = {}
    found = source.read(CA_KEY)
    if found is not None:
        records[CA_KEY] = found
        for folder in (SHARD_FOLDER, LEGACY_CREDENTIALS):  # none in a version-1 state
            for name in source.list(folder):
                key = f"{folder}/{name}"
                if (record := source.read(key)) is not None:
                    records[key] = record
    # An older state is moved into shards by the journal, here in memory.
    return Journal(_CopiedStore(source.description, records)).load().state


# --- the command -----------------------------------------------------------------------


def render_table(events: list[Event]) -> str:
    header = ("TIME", "KIND", "NAME", "ACTION", "REASON")
    rows = [
        (
            ("" if e.exact else "~") + e.at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            e.kind,
            e.name,
            e.action,
            e.reason + (f" (FAILED: {e.error})" if e.error else ""),
        )
        for e in events
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4]])
        for row in [header, *rows]
    )


def _duration(text: str) -> timedelta:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= timedelta(0):
        raise argparse.ArgumentTypeError("must be positive")
    return value


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``plan`` on the CLI's subparsers; the handler is :func:`command`."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "plan", help="forecast every renewal and root-rotation phase, with dates; writes nothing"
    )
    parser.add_argument(
        "--config", type=Path, help="configuration file (default: $CA_DAEMON_CONFIG)"
    )
    parser.add_argument(
        "--until",
        type=_duration,
        default=DEFAULT_UNTIL,
        metavar="DURATION",
        help=f"how far ahead (default: {format_duration(DEFAULT_UNTIL)})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def command(args: argparse.Namespace, settings: Settings) -> int:

    start = _ceil_second(datetime.now(UTC))
    until: timedelta = args.until
    try:
        state = load_state(settings)
    except (JournalError, AnchorError) as exc:
        print(f"error: reading state: {exc}", file=sys.stderr)
        return 1
    result = simulate(state, settings, start, start + until, resolution=DEFAULT_RESOLUTION)
    if args.json:
        print(json.dumps([e.to_json() for e in result.events], indent=2))
    else:
        print(render_table(result.events))
        if any(not e.exact for e in result.events):
            print(
                "~ the date depends on a certificate not issued yet: its renewal jitter "
                f"(up to {settings.rotation.jitter:.0%} of rotate_before) is not known; "
                f"such renewals are shown grouped by {format_duration(DEFAULT_RESOLUTION)}"
            )
        print(
            f"earliest possible dates: every publisher confirming at once, every Pod current; "
            f"the daemon acts at its first check after each (every "
            f"{format_duration(settings.rotation.check_interval)})"
        )
    if result.truncated:
        print(
            f"warning: stopped after {result.passes} passes at {result.stopped_at}: "
            "later events are not shown (use a shorter --until)",
            file=sys.stderr,
        )
    for error in result.errors[:20]:
        print(f"warning: simulated step failed: {error}", file=sys.stderr)
    return EXIT_OK
