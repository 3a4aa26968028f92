"""A fault at every step boundary of a root rotation, then a restart on the same data.

The anchor, the journal's record store and the publisher are wrapped so that the N-th
call to any of them raises (an AnchorError, an OSError or a RuntimeError, by turns),
either before the call takes effect or just after it did (a crash between an effect and
the caller learning of it). After the fault the rotation goes on with fresh Engine
objects on the same data, as a restarted process would. For every N, in both modes:
the invariants hold after every publish, the rotation completes with one new root, no
extra root is ever created in the anchor, and the journal and the published files agree.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, TypeVar

import pytest
from cryptography import x509

from ca_daemon.anchor.base import CA
from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.settings import Settings
from ca_daemon.errors import AnchorError
from ca_daemon.journal.open import file_journal
from ca_daemon.journal.store.records import Record, RecordStore
from ca_daemon.model.state import OpState, Phase, State
from ca_daemon.model.world import TrustWorld
from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.pki.keys import KeyType
from ca_daemon.pki.profiles import Subject, Validity
from ca_daemon.publish.base import PublishReport
from ca_daemon.report.verify import verify_directory
from ca_daemon.rotation.engine import Engine
from tests.support.invariants import read_directory
from tests.support.rotation_configs import REQUEST_AT, T0, short_rotation_settings
from tests.support.rotation_harness import (
    CheckedPublisher,
    Clock,
    checked_directory_publisher,
)
from tests.support.servers.linkerd import LinkerdCheck

pytestmark = pytest.mark.integration

T = TypeVar("T")
Mode = Literal["before", "after"]

MAX_PASSES = 20
# Refs follow one serial: root-1 and kong-2 at bootstrap, root-3 and kong-4 in the rotation.
FIRST_ROOT, NEW_ROOT = "root-1", "root-3"
# Every kind of boundary a rotation crosses; each must be hit by some N.
BOUNDARIES = {
    "anchor.check",
    "anchor.create_root",
    "anchor.create_intermediate",
    "anchor.sign_ca",
    "anchor.sign_client",
    "anchor.set_default",
    "store.read",
    "store.list",
    "store.write ca",
    "store.write credential",
    "publish",
}


# --- fault injection ----------------------------------------------------------------------


class InjectedFault(RuntimeError):
    pass


def _fault(n: int, kind: str) -> Exception:
    """Vary the exception type: what a backend raises, what the OS raises, and a bug."""
    message = f"injected fault #{n} at {kind}"
    match n % 3:
        case 0:
            return AnchorError(message)
        case 1:
            return OSError(5, message)
        case _:
            return InjectedFault(message)


@dataclass
class Faults:
    """Counts every call to the wrapped parts; the ``at``-th one raises."""

    at: int | None = None
    mode: Mode = "before"
    calls: list[str] = field(default_factory=list)
    fired: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, kind: str, action: Callable[[], T]) -> T:
        with self._lock:
            self.calls.append(kind)
            hit = len(self.calls) == self.at
        if not hit:
            return action()
        self.fired = kind
        if self.mode == "after":
            action()  # the effect happened; the caller never learns of it
        raise _fault(len(self.calls), kind)


class FaultyAnchor:
    def __init__(self, inner: LocalAnchor, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self.description = inner.description
        self.roots_made: list[x509.Certificate] = []

    def check(self) -> None:
        self.faults.call("anchor.check", self.inner.check)

    def create_root(self, ref: str, subject: Subject, key_type: KeyType, validity: Validity) -> CA:
        def create() -> CA:
            made = self.inner.create_root(ref, subject, key_type, validity)
            self.roots_made.append(made.cert)  # also when the caller never hears of it
            return made

        return self.faults.call("anchor.create_root", create)

    def create_intermediate(self, ref: str, root: CA, subject: Subject, validity: Validity) -> CA:
        return self.faults.call(
            "anchor.create_intermediate",
            lambda: self.inner.create_intermediate(ref, root, subject, validity),
        )

    def sign_ca(
        self, root: CA, csr: x509.CertificateSigningRequest, subject: Subject, validity: Validity
    ) -> x509.Certificate:
        return self.faults.call(
            "anchor.sign_ca", lambda: self.inner.sign_ca(root, csr, subject, validity)
        )

    def sign_client(
        self,
        intermediate: CA,
        csr: x509.CertificateSigningRequest,
        subject: Subject,
        validity: Validity,
    ) -> x509.Certificate:
        return self.faults.call(
            "anchor.sign_client",
            lambda: self.inner.sign_client(intermediate, csr, subject, validity),
        )

    def set_default(self, root: CA, intermediate: CA | None) -> None:
        self.faults.call("anchor.set_default", lambda: self.inner.set_default(root, intermediate))


class FaultyStore:
    def __init__(self, inner: RecordStore, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self.description = inner.description

    def read(self, key: str) -> tuple[Record, int] | None:
        return self.faults.call("store.read", lambda: self.inner.read(key))

    def write(self, key: str, record: Record, version: int) -> int:
        kind = "store.write ca" if key == "" else "store.write credential"
        return self.faults.call(kind, lambda: self.inner.write(key, record, version))

    def delete(self, key: str) -> None:
        self.faults.call("store.delete", lambda: self.inner.delete(key))

    def list(self, folder: str) -> list[str]:
        return self.faults.call("store.list", lambda: self.inner.list(folder))


@dataclass
class FaultyPublisher:
    """Outermost, so the checks run on what was written even when the fault comes after."""

    inner: CheckedPublisher
    faults: Faults
    violations: list[str]
    description: str = ""

    def __post_init__(self) -> None:
        self.description = self.inner.description

    def publish(self, world: TrustWorld) -> PublishReport:
        def checked() -> PublishReport:
            try:
                return self.inner.publish(world)
            except AssertionError as exc:
                # The engine contains every publisher exception; keep the verdict.
                self.violations.append(str(exc))
                raise

        return self.faults.call("publish", checked)


# --- one rotation, restarted after the fault ----------------------------------------------


@dataclass
class Run:
    settings: Settings
    faults: Faults
    clock: Clock
    checked: CheckedPublisher
    violations: list[str]
    roots_made: list[x509.Certificate]
    operation: str | None = None
    passes: int = 0
    restarts: int = 0
    errors: list[str] = field(default_factory=list)
    uncontained: list[str] = field(default_factory=list)  # exceptions out of reconcile()


def _next_time(state: State, now: datetime, run: Run) -> datetime:
    """When the next pass runs: when the rotation's wait is over, else a minute later."""
    ca = state.ca
    rotation = ca.rotation
    if run.operation is None:
        return max(now, REQUEST_AT)
    if ca.phase is Phase.PROPAGATING and rotation and rotation.confirmed_at:
        return max(now, rotation.confirmed_at + run.settings.rotation.propagation_delay)
    if ca.phase is Phase.RETIRING and rotation and rotation.retire_after:
        return max(now, rotation.retire_after)
    return now + timedelta(minutes=1)


def _done(state: State, run: Run) -> bool:
    ca = state.ca
    op = ca.operation(run.operation) if run.operation else None
    return (
        ca.phase is Phase.STEADY
        and len(ca.roots) == 1
        and ca.roots[0].ref != FIRST_ROOT
        and op is not None
        and op.state is OpState.SUCCEEDED
    )


def rotate_with_fault(
    tmp_path: Path, linkerd_check: LinkerdCheck, at: int | None, mode: Mode
) -> Run:
    """Bootstrap, request a root rotation, and pass until it is done; the ``at``-th call
    to the anchor, store or publisher fails. Every pass is a fresh Engine (a restart)."""
    settings = short_rotation_settings(tmp_path)
    data = settings.anchor.local.dir
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    faults = Faults(at=at, mode=mode)
    clock = Clock(T0)
    checked = checked_directory_publisher(settings, clock, linkerd_check)
    violations: list[str] = []
    run = Run(settings, faults, clock, checked, violations, [])

    def engine() -> Engine:
        anchor = FaultyAnchor(LocalAnchor(data, passphrase), faults)
        anchor.roots_made = run.roots_made
        journal = file_journal(settings, passphrase)
        journal.store = FaultyStore(journal.store, faults)
        publisher = FaultyPublisher(checked, faults, violations)
        return Engine(settings, anchor, journal, [publisher], clock=clock)

    clean = file_journal(settings, passphrase)  # the test's own view, never faulted
    while True:
        run.passes += 1
        assert run.passes <= MAX_PASSES, f"no end after {MAX_PASSES} passes: {run.errors[-5:]}"
        fired_before = faults.fired
        if run.operation is None and clock.now >= REQUEST_AT:
            try:
                run.operation = engine().request_rotation("trust-anchor", "fault drill")
            except Exception as exc:  # the client sees the error and sends it again
                run.errors.append(f"request: {type(exc).__name__}: {exc}")
        try:
            result = engine().reconcile()
            run.errors += result.errors
        except Exception as exc:  # the process would have died: a restart follows
            run.uncontained.append(f"{type(exc).__name__}: {exc}")
        state = clean.load().state
        if faults.fired != fired_before:
            run.restarts += 1  # the fault hit this pass: restart at once, same time
            continue
        if _done(state, run):
            return run
        clock.now = _next_time(state, clock.now, run)


def run_state(run: Run) -> State:
    settings = run.settings
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    return file_journal(settings, passphrase).load().state


def _bundle(out: Path) -> list[str]:
    return [fingerprint(c) for c in parse_pem_certificates((out / "trust-bundle.pem").read_bytes())]


def assert_rotated_once(run: Run) -> None:
    settings = run.settings
    out = settings.publish_directory
    context = f"fault at call {run.faults.at} ({run.faults.fired}, {run.faults.mode})"
    assert not run.violations, f"{context}: {run.violations}"
    state = run_state(run)
    ca = state.ca
    (root,) = ca.roots
    assert root.ref != FIRST_ROOT and ca.phase is Phase.STEADY, context
    # No extra root: one file per rotation + 1, and no root was ever made twice under a
    # ref (a re-made root would be another certificate, even if it overwrote the file).
    files = sorted(p.stem for p in (settings.anchor.local.dir / "anchor").glob("root-*.crt"))
    assert len(files) == 2 and FIRST_ROOT in files, f"{context}: {files}"
    distinct = {fingerprint(c) for c in run.roots_made}
    assert len(distinct) == 2, f"{context}: {len(distinct)} different roots were created"
    # The journal and the published files agree.
    report = verify_directory(out, run.clock.now)
    assert report.ok, f"{context}: {report.problems}"
    assert _bundle(out) == [fingerprint(root.cert)], context
    published = read_directory(out)
    issuer = state.linkerd_issuer
    assert issuer is not None and published.issuer == issuer.cert, context
    assert set(published.clients) == set(state.kong_clients), context
    inter = ca.active_intermediate
    assert inter is not None and inter.root_ref == root.ref, context
    for name, entry in state.kong_clients.items():
        assert published.clients[name][0] == entry.cert, f"{context}: client {name}"
        assert entry.signer_ref == inter.ref, f"{context}: client {name}"
    assert run.checked.checks > 0


def test_a_clean_rotation_crosses_every_kind_of_boundary(
    tmp_path: Path, linkerd_check: LinkerdCheck
) -> None:
    run = rotate_with_fault(tmp_path, linkerd_check, None, "before")
    assert_rotated_once(run)
    assert run.errors == [] and run.restarts == 0
    assert [r.ref for r in run_state(run).ca.roots] == [NEW_ROOT]
    assert set(run.faults.calls) >= BOUNDARIES, BOUNDARIES - set(run.faults.calls)


@pytest.mark.parametrize("mode", ["before", "after"])
def test_a_fault_at_every_call_then_a_restart_completes_the_rotation(
    tmp_path_factory: pytest.TempPathFactory, linkerd_check: LinkerdCheck, mode: Mode
) -> None:
    clean = rotate_with_fault(tmp_path_factory.mktemp("clean"), linkerd_check, None, mode)
    total = len(clean.faults.calls)
    hit: set[str] = set()
    for n in range(1, total + 1):
        run = rotate_with_fault(tmp_path_factory.mktemp(f"fault{n}"), linkerd_check, n, mode)
        assert run.faults.fired is not None, f"call {n} of {total} was never made"
        assert run.restarts == 1
        # Every step's exception is contained (reported in the pass), none escapes it.
        assert run.uncontained == [], f"call {n} ({run.faults.fired}): {run.uncontained}"
        assert_rotated_once(run)
        hit.add(run.faults.fired)
    # Every N: so every kind of boundary (anchor, store, publisher) got its fault.
    assert hit >= BOUNDARIES, BOUNDARIES - hit
