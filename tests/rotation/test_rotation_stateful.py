"""Let a machine choose the paths: the real planner and engine driven by Hypothesis.

A ``RuleBasedStateMachine`` runs the real engine (real journal on files, the local anchor,
the directory publisher) and a second engine on the same journal through random
interleavings of time passing, manual requests for every target, crashes at any call
boundary, the second engine running a whole pass in the middle of the first one's, a
publish target failing or confirming late, meshed Pods lagging and catching up,
configuration changes and a lost journal. After every rule (and at every publish) the
rotation's invariants are checked on what is published and on the journal.

Lifetimes are hours (a root lives 96 hours, the rest 3 to 8), so a few dozen rules cross
every phase. Time
moves at most 75 minutes between passes: the shortest renewal window configured is 80
minutes, so every certificate is renewed by a pass before it expires. A longer outage of
the daemon itself would let certificates expire, which no design can prevent.

``make prove`` runs the long profile (``--hypothesis-profile=prove``).
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.errors import AnchorError, RequestError
from ca_daemon.journal.journal import Journal
from ca_daemon.journal.open import file_journal
from ca_daemon.model.state import CaRecord, OpState, Phase, RootRole, State, trusted_roots
from ca_daemon.model.world import TrustWorld
from ca_daemon.pki.bundle import fingerprint
from ca_daemon.pki.chain import verify_ca_under_roots
from ca_daemon.publish.base import PublishReport
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.report.verify import verify_directory
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.plan import PROVEN_UNUSED, covers
from ca_daemon.rotation.results import PassResult, step_target_name
from ca_daemon.rotation.steps import ROOT_TARGETS
from tests.support.invariants import InvariantChecker, Published, read_directory
from tests.support.rotation_configs import T0
from tests.support.rotation_harness import Clock
from tests.support.rotation_model import Boundaries, Crash, MemoryTarget, MeshedPods, Watched

pytestmark = pytest.mark.usefixtures("clean_env")

PROPAGATION = timedelta(minutes=10)
SKEW = timedelta(minutes=5)
POOL = ("payments", "orders", "search")
TARGETS = (
    "trust-anchor",
    "all",
    "linkerd-issuer",
    "kong-intermediate",
    "kong",
    *(f"kong/{n}" for n in POOL),
)
ROOT_REQUESTS = ("trust-anchor",) * 3  # root rotations, drawn more often than the rest
PHASES = list(Phase)
RUNNING = OpState.RUNNING
OP_ORDER = {OpState.QUEUED: 0, OpState.RUNNING: 1, OpState.SUCCEEDED: 2, OpState.FAILED: 2}

# Examples and steps explored in this process, for `make prove` to report.
EXPLORED = {"examples": 0, "steps": 0, "passes": 0, "rotations": 0, "proven": 0, "crashes": 0}


def config(
    data: Path, clients: tuple[str, ...], short: bool, restart: str, gate: str = "pods"
) -> dict[str, Any]:
    renewal = (
        {"lifetime": "3h", "rotate_before": "80m"}
        if short
        else {"lifetime": "4h", "rotate_before": "2h"}
    )
    return {
        "anchor": {"local": {"dir": str(data)}},
        "publish": {"kubernetes": {"enabled": False}},
        # Due 32 hours in, with 64 hours to rotate: a journal lost then is rebuilt keeping
        # every other valid root trusted for the longest lifetime + 24 hours (Linkerd's
        # proxy certificates), and no rotation starts before that ends.
        "root": {"lifetime": "96h", "rotate_before": "64h"},
        "linkerd": {
            "issuer": {"lifetime": "4h", "rotate_before": "2h"},
            "restart": restart,
            "gate": gate,
            "confirm": "none",
            "emergency_restart": "all",  # an emergency rolls the model's Pods itself
        },
        "kong": {
            "intermediate": {"lifetime": "8h", "rotate_before": "3h"},
            "clients": [
                {"name": n, "common_name": f"kong.{n}.upstream", **renewal} for n in clients
            ],
        },
        "rotation": {
            "propagation_delay": "10m",
            "clock_skew": "5m",
            "concurrency": 1,  # the N-th call is the same call on every replay
            "jitter": 0,
        },
    }


@dataclass
class Accepted:
    target: str
    requested_at: datetime
    lost: bool = False  # its journal was lost: nothing can carry it out any more


@dataclass
class Replica:
    engine: Engine
    boundaries: Boundaries


class ObservedDirectory:
    """The directory publisher; what it published is checked right after each publish."""

    def __init__(self, out: Path, observe: Callable[[], None]) -> None:
        self.inner = DirectoryPublisher(out)
        self.description = self.inner.description
        self.observe = observe

    def publish(self, world: TrustWorld) -> PublishReport:
        report = self.inner.publish(world)
        self.observe()
        return report


def step(method: Callable[..., None]) -> Callable[..., None]:
    """A rule body: ``clean`` stays False when it raised, so teardown does not pile a
    second failure on the first."""

    @functools.wraps(method)
    def run(self: RotationMachine, *args: Any, **kwargs: Any) -> None:
        self.clean = False
        method(self, *args, **kwargs)
        self.clean = True
        EXPLORED["steps"] += 1

    return run


# The shortest renewal window is 80 minutes: no jump is longer (see the module's doc).
LONGEST_JUMP = timedelta(minutes=75)
jumps = st.one_of(
    st.integers(1, 120).map(lambda s: timedelta(seconds=s)),  # within the propagation delay
    st.integers(1, 15).map(lambda m: timedelta(minutes=m)),
    st.integers(15, 75).map(lambda m: timedelta(minutes=m)),  # across renewals and retiring
)


class RotationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        EXPLORED["examples"] += 1
        self.clean = True
        self.tmp = Path(tempfile.mkdtemp(prefix="ca-daemon-prove-"))
        self.data = self.tmp / "data"
        self.clock = Clock(T0)
        self.clients: tuple[str, ...] = ("payments", "orders")
        self.short = False
        self.restart = "control-plane"
        self.gate = "pods"
        self.pods_gated = True
        self.losses = 0
        self.rebuilt = False
        self.proving: tuple[datetime, int] | None = None  # a proof rotation, and at which loss
        self.settings = self._load()
        self.out = self.settings.publish_directory
        self.checker = InvariantChecker(PROPAGATION, SKEW)
        self.broken: list[str] = []  # invariants broken at a publish
        self.memory = MemoryTarget(on_published=lambda: self._observe("memory"))
        self.pods = MeshedPods(self.clock, self._linkerd_bundle, self._linkerd_issuer)
        self.primary = self._replica()
        self.second = self._replica()
        self.reader = self._reader()
        self.accepted: dict[str, Accepted] = {}
        self.op_states: dict[str, tuple[OpState, str | None]] = {}
        self.rotations_of: dict[str, set[datetime]] = defaultdict(set)
        self.last_version = 0
        self.last_serial = 0
        self.last_phase: tuple[datetime, int] | None = None
        self.revisions: dict[str, int] = {}
        first = self._pass(self.primary)
        assert first is not None and first.ok, first and first.errors
        self.pods.start_all()

    # --- building ------------------------------------------------------------------------------

    def _load(self) -> Settings:
        path = self.tmp / "config.yaml"
        doc = config(self.data, self.clients, self.short, self.restart, self.gate)
        path.write_text(yaml.safe_dump(doc))
        return load_settings(path)

    def _reader(self) -> Journal:
        """The journal as the checks read it: read-only, apart from both engines'."""
        passphrase = load_or_create_passphrase(self.settings.anchor.local.effective_passphrase_file)
        return file_journal(self.settings, passphrase, read_only=True)

    def _replica(self) -> Replica:
        s = self.settings
        bounds = Boundaries()
        passphrase = load_or_create_passphrase(s.anchor.local.effective_passphrase_file)
        engine = Engine(
            s,
            Watched(LocalAnchor(self.data, passphrase), "anchor", bounds),  # type: ignore[arg-type]
            Watched(file_journal(s, passphrase), "journal", bounds, self._written),  # type: ignore[arg-type]
            [
                Watched(
                    ObservedDirectory(self.out, lambda: self._observe("directory")),
                    "directory",
                    bounds,
                ),  # type: ignore[list-item]
                Watched(self.memory, "memory", bounds),  # type: ignore[list-item]
            ],
            clock=self.clock,
            rollout=self.pods,
        )
        return Replica(engine, bounds)

    def _journal_state(self) -> tuple[State, int, dict[str, int]]:
        loaded = self.reader.load()
        return loaded.state, loaded.version, dict(loaded.credential_versions)

    def _linkerd_bundle(self) -> str:
        return (self.out / "linkerd" / "ca.crt").read_text()

    def _linkerd_issuer(self) -> x509.Certificate | None:
        return read_directory(self.out).issuer

    def _retiring_on_proof(self) -> bool:
        record, _ = self.reader.load_ca()
        return record.rotation is not None and record.rotation.proof

    # --- what verifiers see, at every publish -------------------------------------------------

    def _observe(self, source: str) -> None:
        try:
            self._check_published(source)
        except Exception as exc:  # raised here, the engine would contain it
            self.broken.append(f"at {self.clock.now}, reading what {source} published: {exc!r}")

    def _check_published(self, source: str) -> None:
        now = self.clock.now
        directory = read_directory(self.out)
        bundles = {f"directory {k}": v for k, v in directory.bundles.items()}
        world = self.memory.world
        if world is not None:
            bundles["memory bundle"] = world.roots
        if source == "directory":
            issuer, clients = directory.issuer, dict(directory.clients)
        else:
            assert world is not None
            issuer = world.linkerd_issuer.cert if world.linkerd_issuer else None
            clients = {n: (e.cert, *e.chain) for n, e in world.kong_clients.items()}
        try:
            on_proof = self._retiring_on_proof()
            self.checker.observe(now, Published(bundles, issuer, clients), on_proof=on_proof)
        except AssertionError as exc:
            # Raised here, the engine would contain it as a failed publish.
            self.broken.append(f"at {now} after publishing to {source}: {exc}")
        if issuer is not None and source == "directory" and self.pods_gated:
            # A meshed Pod's proxy verifies peers under the bundle it started with. (With
            # linkerd.gate: time, that holds only if Pods restart within the delay.)
            pod_bundles = self.pods.bundles()
            for pod, roots in pod_bundles.items():
                for problem in verify_ca_under_roots(issuer, list(roots), now):
                    self.broken.append(f"at {now}: linkerd issuer against {pod}: {problem}")
            # What each proxy presents must verify wherever it is checked: in every
            # published bundle and every Pod's.
            verifiers = {**bundles, **pod_bundles}
            for pod, presented in self.pods.presented(now).items():
                for where, roots in verifiers.items():
                    for problem in verify_ca_under_roots(presented, list(roots), now):
                        self.broken.append(f"at {now}: {pod} presents, {where}: {problem}")

    # --- one pass ----------------------------------------------------------------------------

    def _pass(self, replica: Replica) -> PassResult | None:
        open_before = self._open_targets()
        replica.boundaries.issued.clear()
        try:
            result: PassResult | None = replica.engine.reconcile()
        except Crash:
            result = None
            EXPLORED["crashes"] += 1
        finally:
            replica.boundaries.disarm()
        EXPLORED["passes"] += 1
        assert not self.broken, "\n".join(self.broken)
        self._proof_ends_with_the_old_root_gone()
        self.pods.tick()
        storm = {k: n for k, n in replica.boundaries.issued.items() if n > 1}
        done = [f"{s.action} {s.name}" for s in result.steps] if result else "(crashed)"
        assert not storm, f"issued more than once in a pass at {self.clock.now}: {storm}; {done}"
        if result is not None:
            for s in result.steps:
                target = step_target_name(s)
                if s.manual and s.ok and target is not None:
                    assert any(covers(t, target) for t in open_before), (
                        f"{s.action} {s.name} served a request that was no longer open"
                    )
            retired = [s for s in result.steps if s.action == "Retire" and s.ok]
            EXPLORED["rotations"] += len(retired)
            EXPLORED["proven"] += sum(s.reason == PROVEN_UNUSED for s in retired)
        return result

    def _proof_ends_with_the_old_root_gone(self) -> None:
        """A root rotation that retires on proof ends only once no meshed Pod trusts the
        old root any more (a proxy that does would accept what a leaked key signed)."""
        record, _ = self.reader.load_ca()
        rotation = record.rotation
        if rotation is not None and rotation.proof:
            self.proving = (rotation.started_at, self.losses)
            return
        same = rotation is not None and self.proving and rotation.started_at == self.proving[0]
        if self.proving is None or same:
            return
        ended, self.proving = self.proving, None
        if ended[1] != self.losses:
            return  # the journal was lost: the rotation was dropped, not finished
        published = {fingerprint(c) for c in read_directory(self.out).bundles["trust-bundle.pem"]}
        for pod, roots in self.pods.bundles().items():
            kept = {fingerprint(c) for c in roots} - published
            assert not kept, f"{pod} still trusts {sorted(kept)} after a retirement on proof"

    def _open_targets(self) -> list[str]:
        try:
            record, _ = self.reader.load_ca()  # the operations only: no credential shard
        except Exception:
            return []
        return [o.target for o in record.operations if o.open]

    # --- rules ---------------------------------------------------------------------------------

    @rule(deltas=st.lists(jumps, min_size=1, max_size=6), restarts=st.booleans())
    @step
    def time_passes(self, deltas: list[timedelta], restarts: bool = False) -> None:
        """The daemon's passes, each after some time; maybe an operator restarts the data
        plane first (linkerd.restart: control-plane leaves that to them)."""
        if restarts:
            self.pods.operator_restarts()
        for delta in deltas:
            self.clock.now += delta
            self._pass(self.primary)

    @rule(passes=st.integers(1, 8))
    @step
    def hours_pass(self, passes: int) -> None:
        """Long stretches: renewals, retirements and a scheduled root rotation come due.
        Over hours an operator restarts the data plane (linkerd.restart: control-plane
        leaves that to them); a Pod that lags still refuses."""
        for _ in range(passes):
            self.clock.now += LONGEST_JUMP
            self.pods.operator_restarts()
            self._pass(self.primary)

    @rule()
    @step
    def pass_again_at_the_same_instant(self) -> None:
        """A second pass with nothing new issues nothing: no storms across passes."""
        first = self._pass(self.primary)
        again = self._pass(self.primary)
        if first is not None and first.ok and again is not None:
            # Counted at the anchor: whatever the pass reports, nothing was signed.
            issued = dict(self.primary.boundaries.issued)
            assert not issued, f"a pass right after a clean one issued {issued}"

    @rule(
        what=st.sampled_from(ROOT_REQUESTS + TARGETS),
        ahead=st.integers(0, 5),
        standby=st.booleans(),
        emergency=st.booleans(),
    )
    @step
    def manual_request(self, what: str, ahead: int, standby: bool, emergency: bool = False) -> None:
        """A request, from the leader or a standby whose clock may be seconds ahead; an
        emergency (the root then retires on proof) where one applies."""
        self._request(what, ahead, standby, emergency)

    def _request(self, what: str, ahead: int, standby: bool, emergency: bool = False) -> None:
        engine = (self.second if standby else self.primary).engine
        at = self.clock.now + timedelta(seconds=ahead)
        try:
            op_id = engine.request_rotation(
                what, "prove", now=at, migrate=not standby, emergency=emergency
            )
        except RequestError:
            return
        known = self.accepted.get(op_id)
        if known is not None:  # coalesced: the same target's open request
            assert known.target == what and not known.lost
            return
        self.accepted[op_id] = Accepted(what, at)

    @rule(at=st.integers(1, 16))
    @step
    def crash_mid_pass(self, at: int) -> None:
        """kill -9 at the at-th call across the anchor, journal and publishers; restart."""

        def die(where: str) -> None:
            raise Crash(where)

        self.primary.boundaries.arm(at, die)
        self._pass(self.primary)
        self.primary = self._replica()

    @rule(
        at=st.integers(1, 14),
        pauses=st.lists(st.one_of(st.just(timedelta(0)), jumps), min_size=1, max_size=3),
        request=st.booleans(),
    )
    @step
    def second_engine_runs_inside_a_pass(
        self, at: int, pauses: list[timedelta], request: bool = False
    ) -> None:
        """A replica that still thinks it leads, paused at the at-th call of its pass (a
        GC pause, a slow network) while the other one (asked for a root rotation, maybe)
        runs a pass after each pause; then it goes on with what it had decided (a stale
        writer)."""

        def other_passes(where: str) -> None:
            for i, pause in enumerate(pauses):
                if request and i == 1:  # once the first pass may have ended a rotation
                    self._request("trust-anchor", 0, True)
                self.clock.now += pause
                self.pods.operator_restarts()
                self._pass(self.second)

        self.primary.boundaries.arm(at, other_passes)
        stale = self.memory.stale_offers
        self._pass(self.primary)
        paused_at = self.primary.boundaries.fired or ""
        if not paused_at.endswith(".publish"):
            # Paused before the fence: the journal had moved on when it looked.
            assert self.memory.stale_offers == stale, f"published a stale world ({paused_at})"

    @rule()
    @step
    def failover(self) -> None:
        self.primary, self.second = self.second, self.primary
        self._pass(self.primary)

    @rule(mode=st.sampled_from(["raise", "refuse", "unconfirmed"]), passes=st.integers(1, 6))
    @step
    def target_fails(self, mode: str, passes: int) -> None:
        self.memory.failing = mode  # type: ignore[assignment]
        self.memory.failing_for = passes

    @rule(pod=st.sampled_from(MeshedPods.names), passes=st.integers(1, 6))
    @step
    def pod_lags(self, pod: str, passes: int) -> None:
        self.pods.stuck[pod] = passes

    def operator_restarts_pods(self) -> None:
        self.pods.operator_restarts()

    @rule(
        clients=st.sets(st.sampled_from(POOL), min_size=1),
        short=st.booleans(),
        restart=st.sampled_from(["control-plane", "all"]),
        gate=st.sampled_from(["pods", "time"]),
    )
    @step
    def reconfigure(self, clients: set[str], short: bool, restart: str, gate: str) -> None:
        """New configuration, and both engines restarted with it."""
        self.clients, self.short, self.restart = tuple(sorted(clients)), short, restart
        self.gate = gate
        # Under the time gate a Pod may miss a rotation; it is not checked from then on.
        self.pods_gated = self.pods_gated and gate == "pods"
        self.settings = self._load()
        self.primary, self.second = self._replica(), self._replica()
        self.reader = self._reader()

    @precondition(lambda self: self.losses == 0)
    @rule()
    @step
    def journal_lost(self) -> None:
        """Every journal record deleted (state.version, the high-water mark, survives).
        Once per example: each rebuild keeps the other roots trusted for 28 hours, and at
        these lifetimes repeated losses would hold the root past its expiry (a real root
        lives years)."""
        self.losses += 1
        self.rebuilt = True
        (self.data / "state.json").unlink(missing_ok=True)
        for record in (self.data / "state.d").rglob("*.json"):
            record.unlink()
        for accepted in self.accepted.values():
            accepted.lost = True
        self.last_phase = None
        self.revisions.clear()

    # --- invariants on the journal, after every rule ---------------------------------------------

    def _ca_moves_forward(self, ca: CaRecord, version: int) -> None:
        """The CA record's version and serial never go back, nor a rotation's phase."""
        assert version >= self.last_version, f"journal version {version} < {self.last_version}"
        assert ca.serial >= self.last_serial, f"serial {ca.serial} < {self.last_serial}"
        self.last_version, self.last_serial = version, ca.serial
        if ca.rotation is not None:
            phase = (ca.rotation.started_at, PHASES.index(ca.phase))
            if self.last_phase is not None and self.last_phase[0] == phase[0]:
                assert phase[1] >= self.last_phase[1], f"phase went back to {ca.phase}"
            self.last_phase = phase

    def _written(self, method: str) -> None:
        """After every journal call of either engine: a stale writer that overwrote a newer
        record shows here, before later writes hide it."""
        if not method.startswith(("record_", "save_")):
            return
        try:
            ca, version = self.reader.load_ca()
            if ca.roots:
                self._ca_moves_forward(ca, version)
        except AssertionError as exc:  # raised here, the engine would contain it
            self.broken.append(f"at {self.clock.now} after {method}: {exc}")

    @invariant()
    def journal_moves_only_forward(self) -> None:
        try:
            state, version, revisions = self._journal_state()
        except FileNotFoundError:
            return
        ca = state.ca
        if not ca.roots:
            return  # lost, and not rebuilt yet
        self._ca_moves_forward(ca, version)
        # At most one root rotation at a time: two roots trusted at most, one next. (A
        # rebuilt journal trusts every root still valid until it is steady again.)
        self.rebuilt = self.rebuilt and ca.phase is not Phase.STEADY
        assert self.rebuilt or len(trusted_roots(ca)) <= 2, [r.ref for r in ca.roots]
        assert sum(r.role is RootRole.NEXT for r in ca.roots) <= 1
        running = [
            o for o in ca.operations if o.target in ROOT_TARGETS and o.state.value == "running"
        ]
        assert len(running) <= 1, running
        if ca.rotation is not None and ca.rotation.operation is not None:
            self.rotations_of[ca.rotation.operation].add(ca.rotation.started_at)
            assert len(self.rotations_of[ca.rotation.operation]) == 1, "one request, two"
        # Each credential record's revision only grows (a record deleted, with its client
        # or the whole journal, starts again at 1).
        self.revisions = {k: v for k, v in self.revisions.items() if k in revisions}
        for key, revision in revisions.items():
            assert revision >= self.revisions.get(key, 0), f"{key} went back to {revision}"
            self.revisions[key] = revision
        for op in ca.operations:
            before = self.op_states.get(op.id)
            if before is not None:
                assert OP_ORDER[op.state] >= OP_ORDER[before[0]], f"{op.id} went back"
                if OP_ORDER[before[0]] == 2:
                    assert (op.state, op.result) == before, f"{op.id} finished twice"
            self.op_states[op.id] = (op.state, op.result)

    # --- the end: healthy again, every accepted request carried out ------------------------------

    def teardown(self) -> None:
        try:
            if self.clean:
                self._drain()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _drain(self) -> None:
        self.memory.failing_for = 0
        self.pods.stuck.clear()
        for _ in range(120):
            self.clock.now += LONGEST_JUMP
            self.pods.operator_restarts()
            result = self._pass(self.primary)
            self.journal_moves_only_forward()
            state, *_ = self._journal_state()
            if (
                result is not None
                and result.ok
                and state.ca.phase is Phase.STEADY
                and not any(o.open for o in state.ca.operations)
            ):
                break
        else:
            raise AssertionError(f"never settled: phase {state.ca.phase}, {result}")
        ops = {o.id: o for o in state.ca.operations}
        for op_id, accepted in self.accepted.items():
            if accepted.lost:
                continue
            op = ops.get(op_id)
            assert op is not None, f"accepted request {op_id} ({accepted.target}) vanished"
            assert op.state in (OpState.SUCCEEDED, OpState.FAILED), op
            if op.state is OpState.FAILED:
                assert op.result, op
        report = verify_directory(self.out, self.clock.now)
        assert report.ok, report


def _run(machine: type[RuleBasedStateMachine]) -> None:
    run_state_machine_as_test(machine, settings=settings())


def test_rotation_invariants_hold_on_every_path_hypothesis_chooses() -> None:
    _run(RotationMachine)
    if settings().max_examples > 100:  # the long profile says what it explored
        print(f"\nexplored: {EXPLORED}")
    assert EXPLORED["examples"] > 0 and EXPLORED["passes"] > 0
    assert EXPLORED["proven"] > 0, f"no root retired on proof: {EXPLORED}"


# --- what the machine found, kept as ordinary tests (each failed before its fix) -------------


def _replay(*steps: Callable[[RotationMachine], None]) -> None:
    """Run ``steps`` on a fresh machine, its invariants after each, then its teardown (which
    drives it until every accepted request is carried out)."""
    machine = RotationMachine()
    try:
        for run in steps:
            run(machine)
            machine.journal_moves_only_forward()
    except BaseException:
        machine.clean = False
        raise
    finally:
        machine.teardown()


MINUTE, TWO_SECONDS = timedelta(minutes=1), timedelta(seconds=2)
ROTATING = [  # a root rotation requested, the two-root bundle confirmed, Linkerd rolled
    lambda m: m.manual_request("trust-anchor", 0, False),
    lambda m: m.time_passes([MINUTE]),
    lambda m: m.time_passes([TWO_SECONDS]),
]
ACTIVATED = [*ROTATING, lambda m: m.time_passes([timedelta(minutes=11)], True)]
EMERGENCY = [  # an emergency: its two-root bundle confirmed, the data plane rolled
    lambda m: m.manual_request("trust-anchor", 0, False, True),
    lambda m: m.time_passes([MINUTE]),
    lambda m: m.time_passes([TWO_SECONDS]),
]
# Activated, everything re-issued and the two-root bundle confirmed once more.
REISSUED = [*EMERGENCY, lambda m: m.time_passes([timedelta(minutes=10)])]
# For each of the rotation's guards, a path on which the machine fails without it (the
# derandomized examples above find some of these; these find each, every time).
GUARDED_PATHS: dict[str, list[Callable[[RotationMachine], Any]]] = {
    # Pods restarted at once: only the delay stands between confirmation and activation.
    "propagation delay": [*ROTATING, lambda m: m.time_passes([timedelta(seconds=30)], True)],
    "every publisher confirms": [lambda m: m.target_fails("refuse", 6), *ACTIVATED],
    "pods gate": [lambda m: m.pod_lags("web-0", 6), *ACTIVATED],
    "retire time": [*ACTIVATED, lambda m: m.time_passes([MINUTE])],
    # Paused after loading, while the other engine prepares and confirms the rotation.
    "journal check-and-set": [
        lambda m: m.manual_request("trust-anchor", 0, False),
        lambda m: m.second_engine_runs_inside_a_pass(3, [timedelta(0)]),
    ],
    # Paused before the fence, while the other retires the old root, rotates again and
    # activates the newest: this one's world is three phases old.
    "publish fence": [
        *ACTIVATED,
        lambda m: m.time_passes([LONGEST_JUMP] * 3),
        lambda m: m.second_engine_runs_inside_a_pass(
            3, [timedelta(minutes=10), MINUTE, TWO_SECONDS, timedelta(minutes=11)], True
        ),
        lambda m: m.time_passes([MINUTE]),
    ],
    # A Pod the second roll did not restart still presents a certificate from the old
    # issuer: the old root stays until it restarts.
    "proof: every Pod restarted since the re-issue": [
        *REISSUED,
        lambda m: m.pod_lags("web-0", 4),
        lambda m: m.time_passes([TWO_SECONDS] + [MINUTE] * 3),
    ],
    # A Pod the third roll did not restart still trusts the old root: the rotation is
    # not over until it restarts.
    "proof: every Pod holds the bundle without the old root": [
        *REISSUED,
        lambda m: m.time_passes([TWO_SECONDS]),
        lambda m: m.pod_lags("web-0", 4),
        lambda m: m.time_passes([MINUTE] * 4),
    ],
}


@pytest.mark.parametrize("guard", sorted(GUARDED_PATHS))
def test_a_path_that_needs_each_guard_keeps_the_invariants(guard: str) -> None:
    _replay(*GUARDED_PATHS[guard])


def test_a_request_accepted_onto_a_lost_journal_survives_the_rebuild() -> None:
    """Any replica may journal a request while the CA record is missing; the rebuild kept
    only what the anchor holds and dropped it: accepted, and never carried out."""
    _replay(
        lambda m: m.journal_lost(),
        lambda m: m.manual_request("trust-anchor", 0, False),
    )


def test_renewals_due_as_the_rotation_activates_are_issued_once() -> None:
    """The issuer and the clients came due in the pass that would activate the next root:
    they were renewed under the old root, then re-issued under the new one, all in that
    pass (twice the work and writes for every credential)."""
    _replay(
        lambda m: m.hours_pass(1),
        lambda m: m.time_passes([timedelta(minutes=35)]),
        lambda m: m.manual_request("trust-anchor", 0, False),
        lambda m: m.time_passes([timedelta(minutes=1)]),  # the two-root bundle confirmed
        lambda m: m.time_passes([timedelta(seconds=2)]),  # Linkerd rolled
        lambda m: m.operator_restarts_pods(),
        lambda m: m.time_passes([timedelta(minutes=15)]),  # renewals due, activation ready
    )


def test_a_second_rebuild_in_the_same_seconds_is_still_published() -> None:
    """A rebuilt journal's epoch came from the pass's clock, which a request from a clock
    seconds ahead moves on: the next rebuild, by the real clock, got a lower epoch, every
    publisher refused it as older, and what was published expired."""
    _replay(
        lambda m: m.journal_lost(),
        lambda m: m.manual_request("kong", 5, True),
        lambda m: m.pass_again_at_the_same_instant(),
        lambda m: m.journal_lost(),
        lambda m: m.time_passes([timedelta(seconds=1)]),
    )


def test_a_certificate_replaced_by_a_shorter_lived_one_holds_the_old_root() -> None:
    """Clients re-issued with a shortened lifetime end sooner than the certificates they
    replaced; the old chain was dated from the credentials left at activation, so the old
    root retired while a replaced certificate (published for a minute) was still valid."""
    _replay(
        lambda m: m.hours_pass(1),
        lambda m: m.manual_request("kong", 0, False),
        lambda m: m.pass_again_at_the_same_instant(),  # re-issued: 4 hours
        lambda m: m.reconfigure({"payments", "orders"}, True, "control-plane", "pods"),
        lambda m: m.time_passes([timedelta(minutes=1)]),
        lambda m: m.manual_request("kong", 0, False),
        lambda m: m.time_passes([timedelta(minutes=1)]),  # re-issued: 3 hours
        lambda m: m.manual_request("trust-anchor", 0, False),
        lambda m: m.time_passes([timedelta(minutes=1)]),
        lambda m: m.time_passes([timedelta(seconds=2)]),
        lambda m: m.operator_restarts_pods(),
        lambda m: m.time_passes([timedelta(minutes=15)]),  # activated
        lambda m: m.time_passes([LONGEST_JUMP, LONGEST_JUMP, timedelta(minutes=20)]),
    )


def test_a_confirmation_a_slow_pass_reaches_late_dates_the_delay_from_then() -> None:
    """A pass paused (here: while the other engine ran, 12 minutes later) before the
    publish that completed the confirmation journaled the time it began: the propagation
    delay was over at once, and the next pass activated a root that had been in every
    bundle for seconds. Found by `make prove`."""
    _replay(
        lambda m: m.reconfigure({"payments", "orders"}, False, "all", "time"),
        lambda m: m.manual_request("trust-anchor", 0, False),
        lambda m: m.target_fails("refuse", 1),
        lambda m: m.second_engine_runs_inside_a_pass(7, [timedelta(minutes=12)]),
        lambda m: m.time_passes([TWO_SECONDS, TWO_SECONDS]),
    )


class _RefusingIssuer(LocalAnchor):
    def sign_ca(self, *args: Any, **kwargs: Any) -> Any:
        raise AnchorError("local anchor: signing refused (test)")


def test_a_credential_missing_from_a_lost_journal_stays_published(tmp_path: Path) -> None:
    """The journal is lost and the issuer cannot be issued again: what was published for
    it stays (found when a stale writer's issue of it lost a check-and-set race)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path / "data", ("payments",), False, "none")))
    s = load_settings(path)
    passphrase = load_or_create_passphrase(s.anchor.local.effective_passphrase_file)

    def engine(anchor: type[LocalAnchor]) -> Engine:
        journal = file_journal(s, passphrase)
        publisher = DirectoryPublisher(s.publish_directory)
        return Engine(s, anchor(s.anchor.local.dir, passphrase), journal, [publisher])

    assert engine(LocalAnchor).reconcile(now=T0).ok
    linkerd = s.publish_directory / "linkerd"
    issuer = {n: (linkerd / n).read_bytes() for n in ("tls.crt", "tls.key")}
    (s.anchor.local.dir / "state.json").unlink()
    for record in (s.anchor.local.dir / "state.d").rglob("*.json"):
        record.unlink()

    result = engine(_RefusingIssuer).reconcile(now=T0 + timedelta(minutes=5))
    assert not result.ok and any("signing refused" in e for e in result.errors), result.errors
    assert {n: (linkerd / n).read_bytes() for n in ("tls.crt", "tls.key")} == issuer
    assert (linkerd / "ca.crt").read_bytes() == (
        s.publish_directory / "trust-bundle.pem"
    ).read_bytes()
    assert (s.publish_directory / "kong" / "clients" / "payments" / "tls.crt").exists()
