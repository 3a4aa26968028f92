"""SIGKILL the running daemon at four points of a root rotation; restart it each time.

``python -m ca_daemon run`` on the embedded default's parts (local anchor, directory
publishing) with real, short durations: 20-second issued lifetimes, so the old chain
expires and retirement comes within the test, a 3-second propagation delay, a pass
every second. The daemon is killed with SIGKILL

1. right after a manual root rotation was accepted (journaled by ``request_rotation``
   from this process, CAS-safe beside the running daemon),
2. after the next root was made in the anchor but before the journal recorded it (the
   window a crash must not turn into a second root; held open by taking the journal's
   lock, so the daemon blocks in that save),
3. while ``propagating``,
4. while ``activated`` or ``retiring``,

and restarted on the same data each time. Throughout, every published snapshot is
checked against the SPEC's invariants at wall-clock time; at the end the rotation is
complete, the manual operation succeeded, and no extra root was made.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import pytest

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.journal.journal import Journal
from ca_daemon.journal.open import file_journal
from ca_daemon.model.state import CaRecord, OpState, Phase
from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.report.verify import verify_directory
from ca_daemon.rotation.engine import Engine
from tests.support.cli import DaemonProcess
from tests.support.invariants import InvariantChecker, Published, read_directory
from tests.support.rotation_configs import PROPAGATION, SKEW, real_time_config
from tests.support.servers.tools import log_tail

pytestmark = pytest.mark.integration

# Snapshots are polled, so a bundle is seen a little after it was written, and X.509
# times have whole seconds, so a signing time read back from not-before can be up to a
# second early: the checker allows that much less than the configured delay.
POLL = 0.1
TOLERANCE = timedelta(seconds=1.5)
PHASE_TIMEOUT = 30.0


def snapshot(out: Path) -> Published | None:
    """One published set, never a mix of two: ``..data`` is the same before and after
    reading (the publisher swaps it in one rename and removes the old version)."""
    for _ in range(20):
        try:
            before = os.readlink(out / "..data")
            published = read_directory(out)
            if os.readlink(out / "..data") == before:
                return published
        except FileNotFoundError:  # not published yet, or swapped while reading
            pass
        time.sleep(0.01)
    return None


@dataclass
class Watch:
    """Polls the journal and the published files; checks every snapshot it reads."""

    settings: Settings
    journal: Journal
    daemon: DaemonProcess
    checker: InvariantChecker
    snapshots: int = 0
    phases: list[Phase] = field(default_factory=list)
    # Whether the last root rotation the journal showed retires on proof: kept once it
    # ended, as a snapshot read after the retirement may be the first without the root.
    on_proof: bool = False

    def record(self) -> CaRecord:
        record, _ = self.journal.load_ca()
        if not self.phases or self.phases[-1] is not record.phase:
            self.phases.append(record.phase)
        if record.rotation is not None:
            self.on_proof = record.rotation.proof
        return record

    def observe(self) -> None:
        self.record()  # before the snapshot: what it shows is at least as new
        published = snapshot(self.settings.publish_directory)
        if published is not None:
            self.checker.observe(datetime.now(UTC), published, on_proof=self.on_proof)
            self.snapshots += 1

    def until_files(self, what: str, found: Callable[[], set[str]]) -> set[str]:
        """Like ``until``, on files (the journal cannot change while its lock is held)."""
        deadline = time.monotonic() + PHASE_TIMEOUT
        while time.monotonic() < deadline:
            self.daemon.alive()
            self.observe()
            names = found()
            if names:
                return names
            time.sleep(0.02)
        raise AssertionError(f"no {what} after {PHASE_TIMEOUT}s:\n{log_tail(self.daemon.log)}")

    def until(self, what: str, done: Callable[[CaRecord], bool]) -> CaRecord:
        deadline = time.monotonic() + PHASE_TIMEOUT
        while time.monotonic() < deadline:
            self.daemon.alive()
            self.observe()
            record = self.record()
            if done(record):
                return record
            time.sleep(POLL)
        raise AssertionError(
            f"not {what} after {PHASE_TIMEOUT}s (phases {self.phases}):\n"
            f"{log_tail(self.daemon.log)}"
        )


@contextmanager
def journal_lock(settings: Settings) -> Iterator[None]:
    """Hold the lock every journal write takes (FileRecordStore's ``state.lock``): a
    daemon that reaches a save waits there, with everything before the save done."""
    fd = os.open(settings.anchor.local.dir / "state.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _anchor_roots(settings: Settings) -> dict[str, bytes]:
    anchor_dir = settings.anchor.local.dir / "anchor"
    return {p.stem: p.read_bytes() for p in sorted(anchor_dir.glob("root-*.crt"))}


def _bundle(out: Path) -> list[str]:
    pem = (out / "trust-bundle.pem").read_bytes()
    return [fingerprint(c) for c in parse_pem_certificates(pem)]


class Drill(NamedTuple):
    """What both tests start from: the daemon (not started yet) on a real-time config, the
    watch on it, and an engine in this process that requests rotations via the journal."""

    settings: Settings
    journal: Journal
    daemon: DaemonProcess
    watch: Watch
    requester: Engine


def _drill(tmp_path: Path) -> Drill:
    path = real_time_config(tmp_path)
    settings = load_settings(path)
    # Created before the daemon starts, so this process and the daemon share it.
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    journal = file_journal(settings, passphrase)
    daemon = DaemonProcess(path, tmp_path / "daemon.log")
    watch = Watch(settings, journal, daemon, InvariantChecker(PROPAGATION - TOLERANCE, SKEW))
    requester = Engine(settings, LocalAnchor(settings.anchor.local.dir, passphrase), journal, [])
    return Drill(settings, journal, daemon, watch, requester)


def test_kill_9_at_four_points_of_a_root_rotation_then_restart(tmp_path: Path) -> None:
    settings, journal, daemon, watch, requester = _drill(tmp_path)
    out = settings.publish_directory
    started = time.monotonic()
    daemon.start()
    try:
        first = watch.until(
            "bootstrapped",
            lambda r: (
                r.active_root is not None
                and r.active_intermediate is not None
                and (out / "kong" / "clients" / "payments" / "tls.crt").exists()
            ),
        )
        assert first.phase is Phase.STEADY
        assert first.active_root is not None
        old_ref = first.active_root.ref

        # 1. Accepted (journaled) by this process, then the daemon dies at once.
        operation = requester.request_rotation("trust-anchor", "kill -9 drill")
        daemon.kill9("right after the manual request was accepted")
        at_kill = watch.record()
        op = at_kill.operation(operation)
        assert op is not None and op.open, "the accepted request is in the journal"

        # 2. The restarted daemon's first step is that request: it makes the next root,
        # then waits for the lock to save it. Killed there, the root exists only in the
        # anchor; the next start must adopt it, not make another.
        with journal_lock(settings):
            daemon.start()
            made = watch.until_files(
                "the next root made", lambda: set(_anchor_roots(settings)) - {old_ref}
            )
            daemon.kill9("after the next root was made, before the journal recorded it")
        (next_ref,) = made
        unrecorded = watch.record()
        assert unrecorded.phase is Phase.STEADY
        assert [r.ref for r in unrecorded.roots] == [old_ref], "saved without the journal lock?"
        made_cert = _anchor_roots(settings)[next_ref]
        daemon.start()

        # 3. While the two-root bundle propagates.
        watch.until("propagating", lambda r: r.phase is Phase.PROPAGATING)
        daemon.kill9("while propagating")
        assert watch.record().phase is Phase.PROPAGATING
        daemon.start()

        # 4. After activation: the new root signs, the old one is still trusted.
        watch.until("activated", lambda r: r.phase in (Phase.ACTIVATED, Phase.RETIRING))
        daemon.kill9("while activated or retiring")
        killed_in = watch.record().phase
        assert killed_in in (Phase.ACTIVATED, Phase.RETIRING), killed_in
        daemon.start()

        def rotated(r: CaRecord) -> bool:
            found = r.operation(operation)
            return (
                r.phase is Phase.STEADY
                and len(r.roots) == 1
                and r.roots[0].ref != old_ref
                and found is not None
                and not found.open
                and _bundle(out) == [fingerprint(r.roots[0].cert)]
            )

        final = watch.until("rotated", rotated)
        # A few more passes in steady state: the renewals under the new root go on.
        for _ in range(20):
            watch.observe()
            time.sleep(POLL)
        daemon.alive()
    finally:
        daemon.stop()
    elapsed = time.monotonic() - started

    assert len(daemon.kills) == 4
    done = final.operation(operation)
    assert done is not None and done.state is OpState.SUCCEEDED, done
    (root,) = final.roots
    assert done.result == f"rotated to {root.ref}"
    # Every phase was gone through, and one new root was made: no extra one.
    assert {Phase.STEADY, Phase.PROPAGATING, Phase.RETIRING} <= set(watch.phases), watch.phases
    anchor_roots = _anchor_roots(settings)
    assert sorted(anchor_roots) == sorted([old_ref, root.ref]), sorted(anchor_roots)
    # The root made before the crash is the one that was adopted and rotated to.
    assert root.ref == next_ref and anchor_roots[root.ref] == made_cert
    state = journal.load().state
    assert state.linkerd_issuer is not None and state.linkerd_issuer.signer_ref == root.ref
    report = verify_directory(out, datetime.now(UTC))
    assert report.ok, report.problems
    assert watch.snapshots > 50 and watch.checker.observations == watch.snapshots
    assert elapsed < 120, elapsed


def test_kill_9_at_three_points_of_an_emergency_rotation_then_restart(tmp_path: Path) -> None:
    """The same daemon, asked for an emergency: killed right after the request was
    accepted, while propagating, and after it made the new root the anchor's default but
    before the journal recorded the activation (its save held on the journal's lock).
    Restarted each time, it retires the old root on proof, long before the old chain
    (20-second certificates here, so the margin is small but real) would expire."""
    settings, _, daemon, watch, requester = _drill(tmp_path)
    out = settings.publish_directory
    daemon.start()
    try:
        first = watch.until("bootstrapped", lambda r: r.active_intermediate is not None)
        assert first.active_root is not None
        old_ref = first.active_root.ref
        operation = requester.request_rotation("trust-anchor", "drill: leak", emergency=True)
        daemon.kill9("right after the emergency was accepted")
        op = watch.record().operation(operation)
        assert op is not None and op.open and op.emergency
        daemon.start()

        watch.until("propagating", lambda r: r.phase is Phase.PROPAGATING)
        daemon.kill9("while propagating")
        daemon.start()

        confirmed = watch.until(
            "confirmed",
            lambda r: r.rotation is not None and r.rotation.confirmed_at is not None,
        )
        assert confirmed.rotation is not None and confirmed.rotation.emergency
        with journal_lock(settings):
            # Activation makes the new Kong intermediate and sets the anchor's defaults,
            # then blocks on the save.
            watch.until_files(
                "the new Kong intermediate made",
                lambda: (
                    {p.stem for p in (settings.anchor.local.dir / "anchor").glob("kong-*.crt")}
                    - {i.ref for i in confirmed.intermediates}
                ),
            )
            daemon.kill9("activated in the anchor, not yet in the journal")
        assert watch.record().phase is Phase.PROPAGATING
        daemon.start()

        def done(r: CaRecord) -> bool:
            found = r.operation(operation)
            return found is not None and not found.open

        final = watch.until("the emergency finished", done)
        for _ in range(10):
            watch.observe()
            time.sleep(POLL)
        daemon.alive()
    finally:
        daemon.stop()
    assert len(daemon.kills) == 3
    result = final.operation(operation)
    assert result is not None and result.state is OpState.SUCCEEDED, result
    (root,) = final.roots
    assert root.ref != old_ref
    assert _bundle(out) == [fingerprint(root.cert)]
    assert sorted(_anchor_roots(settings)) == sorted([old_ref, root.ref])
    assert {Phase.PROPAGATING, Phase.STEADY} <= set(watch.phases)
    assert verify_directory(out, datetime.now(UTC)).ok
    assert watch.snapshots > 10 and watch.checker.observations == watch.snapshots
