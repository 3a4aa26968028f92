"""Carry out the plan: CA steps one at a time, renewals in batches, journal before effects.

A pass loads the journal, asks ``plan`` what is needed, performs the first CA step
against the anchor, saves the CA record (check-and-set) and asks again. When only
renewals are left they run in parallel batches, each writing its own credential
record. Then the trust world derived from the saved state is published, and what the
publishers confirmed (and, during a root rotation, which meshed Pods lag) is fed back
into ``plan``: that is how a rotation advances on journaled facts. A failure anywhere
leaves the previous, valid credentials published; a crash anywhere resumes from the
journal.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal, Protocol

from cryptography import x509

from ca_daemon.anchor.base import CA, Anchor, existing_cas
from ca_daemon.config.settings import Settings
from ca_daemon.errors import JournalConflict, JournalError, RequestError, RotationError
from ca_daemon.journal.format import shard_of
from ca_daemon.journal.journal import Journal
from ca_daemon.model.state import (
    LINKERD_ISSUER,
    CaRecord,
    IntermediateEntry,
    IssuedEntry,
    Operation,
    OpState,
    Phase,
    RootEntry,
    RootRole,
    Rotation,
    State,
    client_key,
)
from ca_daemon.model.world import TrustWorld, desired_world, newest_content
from ca_daemon.pki.bundle import bundle_hash
from ca_daemon.pki.keys import generate_key, private_key_pem
from ca_daemon.pki.profiles import Kind, Subject, build_csr, capped_validity, check_profile
from ca_daemon.publish.base import Publisher, PublishReport
from ca_daemon.rotation.plan import (
    CREDENTIAL_STEPS,
    ISSUING_STEPS,
    KONG,
    KONG_INTERMEDIATE,
    ROOT_TARGETS,
    TRUST_ANCHOR,
    Activate,
    CaStep,
    ConfirmBundle,
    CreateRoot,
    CredentialStep,
    DropKongClient,
    FinishOperation,
    IssueKongClient,
    IssueKongIntermediate,
    IssueLinkerdIssuer,
    Observations,
    PrepareRoot,
    Propagate,
    RebuildJournal,
    RestartLinkerd,
    Retire,
    StartOperation,
    StartRetiring,
    Step,
    Wait,
    client_subject,
    covers,
    plan,
    retire_after,
)
from ca_daemon.rotation.rebuild import rebuild

log = logging.getLogger(__name__)

# Each round executes a step or publishes; a root rotation needs at most a dozen in
# one pass. Reaching this means plan() is not converging: a bug, reported as an error.
_MAX_ROUNDS = 50
ROTATION = "root-rotation"  # the failure target of the root-rotation steps
_PENDING_SHOWN = 20


class Rollout(Protocol):
    """Rolls Linkerd's workloads and tells which meshed Pods lag (Kubernetes)."""

    description: str

    def restart(self, scope: Literal["control-plane", "all"], at: datetime) -> list[str]: ...

    def pending_pods(self, bundle_pem: str, confirmed_at: datetime) -> list[str]: ...

    def report_pending(self, pods: list[str], bundle_hash: str) -> None: ...


class UnknownTarget(RequestError):
    pass


class RotationInProgress(RequestError):
    """The target conflicts with the root rotation in progress."""


class IssuanceError(RotationError):
    """The anchor answered with a certificate the daemon will not publish."""


@dataclass(frozen=True)
class StepResult:
    kind: Kind
    name: str
    action: str
    reason: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class PassResult:
    steps: list[StepResult] = field(default_factory=list)
    published: dict[str, list[str]] = field(default_factory=dict)
    reports: list[PublishReport] = field(default_factory=list)
    anchor_up: bool = False
    errors: list[str] = field(default_factory=list)
    state: State | None = None
    waiting: str | None = None  # what the root rotation waits for
    pending_pods: tuple[str, ...] | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def step_target(step: Step, settings: Settings) -> tuple[Kind, str, str]:
    """(kind, stable name, failure target) of a step; names stay the same across rotations."""
    match step:
        case CreateRoot(ref=ref):
            return Kind.TRUST_ANCHOR, ref, TRUST_ANCHOR
        case RebuildJournal():
            return Kind.TRUST_ANCHOR, "journal", TRUST_ANCHOR
        case PrepareRoot(ref=ref):
            return Kind.TRUST_ANCHOR, ref, ROTATION
        case Propagate() | ConfirmBundle() | RestartLinkerd() | StartRetiring() | Retire():
            return Kind.TRUST_ANCHOR, "root-rotation", ROTATION
        case Activate():
            return Kind.TRUST_ANCHOR, "root-rotation", ROTATION
        case IssueKongIntermediate(ref=ref):
            # Named by its ref, as roots are, so metrics join with the certificate's series.
            return Kind.KONG_INTERMEDIATE, ref, KONG_INTERMEDIATE
        case StartOperation(operation=op) | FinishOperation(operation=op):
            return Kind.TRUST_ANCHOR, f"operation {op}", f"operation/{op}"
        case IssueLinkerdIssuer():
            return Kind.LINKERD_ISSUER, settings.linkerd.issuer_secret, LINKERD_ISSUER
        case IssueKongClient(name=name) | DropKongClient(name=name):
            return Kind.KONG_CLIENT, name, client_key(name)
        case Wait():
            return Kind.TRUST_ANCHOR, "root-rotation", ROTATION


def _blocked(step: Step, failed: set[str]) -> bool:
    """Skip a step whose own target, or anything it is signed under, failed this pass."""
    if TRUST_ANCHOR in failed:
        return True
    match step:
        case IssueKongClient(name=name) | DropKongClient(name=name):
            return KONG_INTERMEDIATE in failed or client_key(name) in failed
        case IssueKongIntermediate():
            return KONG_INTERMEDIATE in failed
        case IssueLinkerdIssuer():
            return LINKERD_ISSUER in failed
        case Wait():
            return False
        case StartOperation(operation=op) | FinishOperation(operation=op):
            return f"operation/{op}" in failed
        case _:
            return ROTATION in failed


def _require(kind: Kind, cert: x509.Certificate, signer: x509.Certificate | None) -> None:
    problems = list(check_profile(kind, cert).problems)
    if signer is not None and cert.not_valid_after_utc > signer.not_valid_after_utc:
        problems.append("outlives its signer")
    if problems:
        raise IssuanceError(f"{kind.value} from the anchor is unusable: {'; '.join(problems)}")


def _serial(ref: str) -> int:
    return int(ref.rsplit("-", 1)[1])


def _credential_key(step: CredentialStep) -> str:
    if isinstance(step, IssueLinkerdIssuer):
        return LINKERD_ISSUER
    return client_key(step.name)


def _describe(exc: BaseException) -> str:
    # Every exception type is contained; a bare one (e.g. KeyError) still says what it is.
    text = str(exc)
    return text if text and not isinstance(exc, LookupError) else f"{type(exc).__name__}: {text}"


class Engine:
    def __init__(
        self,
        settings: Settings,
        anchor: Anchor,
        journal: Journal,
        publishers: Sequence[Publisher],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rollout: Rollout | None = None,
    ) -> None:
        self.settings = settings
        self.anchor = anchor
        self.journal = journal
        self.publishers = list(publishers)
        self.clock = clock
        self.rollout = rollout
        self._version = 0
        self._credential_versions: dict[str, int] = {}  # revisions
        self._shard_versions: dict[str, int] = {}
        self._last_state: State | None = None  # as last loaded: what is due if a load fails
        # By name: a scan per issue would make a batch of N clients cost N².
        self._clients = {c.name: c for c in settings.kong.clients}

    # --- manual requests ------------------------------------------------------------------

    def valid_target(self, target: str) -> None:
        s = self.settings
        known = {c.name for c in s.kong.clients}
        if target in (TRUST_ANCHOR, "all"):
            return
        if target == LINKERD_ISSUER and s.linkerd.enabled:
            return
        if target in (KONG_INTERMEDIATE, KONG) and s.kong.enabled:
            return
        if target.startswith("kong/") and s.kong.enabled and target[5:] in known:
            return
        raise UnknownTarget(
            f"unknown target {target!r}: one of trust-anchor, linkerd-issuer, "
            "kong-intermediate, kong, kong/<configured client>, all (parts that are enabled)"
        )

    @staticmethod
    def ensure_can_start_rotation(record: CaRecord, target: str) -> None:
        """Raise RotationInProgress when ``target`` would start a second root rotation."""
        if target in ROOT_TARGETS and record.phase is not Phase.STEADY:
            raise RotationInProgress(
                f"a root rotation is in progress (phase {record.phase.value}); "
                f"{target} can be requested once it is back to steady"
            )

    def request_rotation(self, target: str, reason: str = "", now: datetime | None = None) -> str:
        """Journal a manual rotation request and return its operation id.

        The request is saved before this returns, so a request accepted just before a
        crash is still carried out. A target that already has a queued or running
        operation gets that operation's id instead of a second one.
        """
        self.valid_target(target)
        for _ in range(5):
            record, version = self.journal.load_ca()
            for op in record.operations:
                if op.open and op.target == target:
                    return op.id
            self.ensure_can_start_rotation(record, target)
            op = Operation(
                id=uuid.uuid4().hex,
                target=target,
                reason=reason,
                requested_at=now or self.clock(),
            )
            try:
                self.journal.save_ca(record.with_operation(op), version)
            except JournalConflict:
                continue
            log.info("manual rotation of %s requested (operation %s): %s", target, op.id, reason)
            return op.id
        raise JournalError(f"{self.journal.description}: kept changing while saving the request")

    # --- one pass -------------------------------------------------------------------------

    def reconcile(self, now: datetime | None = None) -> PassResult:
        """Issue what is missing or due, advance a root rotation, save, publish."""
        now = now or self.clock()
        result = PassResult()
        try:
            loaded = self.journal.load()
        except Exception as exc:
            result.errors.append(f"loading state from {self.journal.description}: {exc}")
            if self._last_state is not None:  # Vault down is journal and anchor down at once
                self._note_blocked(self._last_state, now, result)
            return result
        state = loaded.state
        self._last_state = state
        # A request journaled after this pass's clock was read (or before a clock step
        # back) must still count as done once re-issued now, or each round would re-issue
        # it again: the pass decides as of the latest request it sees.
        requested = [o.requested_at for o in state.ca.operations if o.open]
        now = max([now, *requested])
        self._version = loaded.version
        self._credential_versions = dict(loaded.credential_versions)
        self._shard_versions = dict(loaded.shard_versions)
        try:
            self.anchor.check()
            result.anchor_up = True
        except Exception as exc:
            result.errors.append(_describe(exc))

        published: TrustWorld | None = None
        failed: set[str] = set()
        if result.anchor_up:
            state, published = self._advance(state, now, result, failed)
        if published is None and state.ca.active_root is not None:
            world = desired_world(state, self.settings, self._version, self._credential_versions)
            _, accepted = self._publish(world, state, now, result)
            if accepted and result.anchor_up:
                state = self._note_published(state, world, now, result)
        state = self._fail_operations(state, now, result)
        if not result.anchor_up:
            self._note_blocked(state, now, result)
        result.state = state
        return result

    def _note_blocked(self, state: State, now: datetime, result: PassResult) -> None:
        """With the anchor down nothing is tried, yet what was due is a failure (counted in
        ca_daemon_rotations_total): an outage must not look like a quiet pass. Operations are
        left running; they complete once the anchor is back."""
        why = result.errors[0] if result.errors else "the trust anchor is unavailable"
        observations = Observations(cluster=self.rollout is not None)
        for step in plan(state, now, self.settings, observations):
            if not isinstance(step, ISSUING_STEPS):
                continue
            kind, name, _ = step_target(step, self.settings)
            result.steps.append(StepResult(kind, name, type(step).__name__, step.reason, why))

    def _advance(
        self, state: State, now: datetime, result: PassResult, failed: set[str]
    ) -> tuple[State, TrustWorld | None]:
        observations = Observations(
            cluster=self.rollout is not None, anchor_cas=self._anchor_cas(state, result, failed)
        )
        published: TrustWorld | None = None
        for _ in range(_MAX_ROUNDS):
            steps = [
                s for s in plan(state, now, self.settings, observations) if not _blocked(s, failed)
            ]
            result.waiting = next((s.reason for s in steps if isinstance(s, Wait)), None)
            ca_steps = [s for s in steps if not isinstance(s, (Wait, *CREDENTIAL_STEPS))]
            if ca_steps:
                try:
                    state = self._run_ca_step(ca_steps[0], state, now, result, failed)
                except JournalConflict as exc:
                    result.errors.append(
                        f"{self.journal.description}: changed by another writer ({exc}); "
                        "this pass stops and the next one decides again"
                    )
                    return state, published
                continue
            renewals = [s for s in steps if isinstance(s, CREDENTIAL_STEPS)]
            if renewals:
                state = self._run_batch(renewals, state, now, result, failed)
                continue
            if state.ca.active_root is None:
                return state, published
            world = desired_world(state, self.settings, self._version, self._credential_versions)
            if world == published:
                return state, published
            observations, accepted = self._publish(world, state, now, result)
            state = self._record_pending(state, observations.pending_pods, result)
            if accepted:
                state = self._note_published(state, world, now, result)
            published = world
        result.errors.append(f"the pass did not settle in {_MAX_ROUNDS} rounds; stopped")
        return state, published

    # --- CA steps --------------------------------------------------------------------------

    def _run_ca_step(
        self, step: CaStep, state: State, now: datetime, result: PassResult, failed: set[str]
    ) -> State:
        kind, name, target = step_target(step, self.settings)
        action = type(step).__name__
        try:
            record = self._execute_ca(step, state, now)
            self._version = self.journal.save_ca(record, self._version)
        except JournalConflict:
            raise
        except Exception as exc:  # one broken step must not stop the others
            message = _describe(exc)
            log.error("%s %s failed: %s", action, name, message)
            result.steps.append(StepResult(kind, name, action, step.reason, message))
            result.errors.append(f"{kind.value} {name}: {message}")
            failed.add(target)
            return state
        log.info("%s %s: %s", action, name, step.reason)
        result.steps.append(StepResult(kind, name, action, step.reason))
        return replace(state, ca=record)

    def _anchor_cas(self, state: State, result: PassResult, failed: set[str]) -> tuple[CA, ...]:
        """The anchor's named CAs when the CA record is empty (lost, or a first start);
        a backend that cannot tell stops the pass rather than risk a fresh root."""
        if state.ca.roots or state.ca.serial:
            return ()
        try:
            return tuple(existing_cas(self.anchor) or ())
        except Exception as exc:
            message = f"listing the CAs in {self.anchor.description}: {_describe(exc)}"
            result.errors.append(message)
            failed.add(TRUST_ANCHOR)
            return ()

    def _save_ca(self, record: CaRecord) -> None:
        self._version = self.journal.save_ca(record, self._version)

    def _execute_ca(self, step: CaStep, state: State, now: datetime) -> CaRecord:
        s = self.settings
        ca = state.ca
        match step:
            case RebuildJournal():
                return rebuild(step.cas, step.reason, state, now, s, self.anchor.description)
            case CreateRoot(ref=ref) | PrepareRoot(ref=ref):
                validity = capped_validity(now, s.root.lifetime, None, s.rotation.clock_skew)
                made = self.anchor.create_root(
                    ref, Subject(s.root_common_name), s.root.key, validity
                )
                _require(Kind.TRUST_ANCHOR, made.cert, None)
                if isinstance(step, CreateRoot):
                    # Noted in the anchor too: a journal rebuilt after a loss finds it there.
                    self.anchor.set_default(CA(made.ref, made.cert), None)
                    entry = RootEntry(made.ref, made.cert, RootRole.ACTIVE, now)
                    return replace(
                        ca,
                        roots=(*ca.roots, entry),
                        serial=_serial(ref),
                        phase_since=ca.phase_since or now,
                    )
                record = replace(
                    ca,
                    roots=(*ca.roots, RootEntry(made.ref, made.cert, RootRole.NEXT, now)),
                    serial=max(ca.serial, _serial(ref)),
                    phase=Phase.PREPARED,
                    phase_since=now,
                    rotation=Rotation(
                        started_at=now,
                        trigger="manual" if step.operation else "schedule",
                        operation=step.operation,
                    ),
                )
                op = ca.operation(step.operation) if step.operation else None
                if op is not None:
                    record = record.with_operation(replace(op, state=OpState.RUNNING))
                return record
            case Propagate():
                return replace(ca, phase=Phase.PROPAGATING, phase_since=now)
            case ConfirmBundle(bundle=bundle):
                assert ca.rotation is not None
                rotation = replace(ca.rotation, confirmed_at=now, confirmed_bundle=bundle)
                return replace(ca, rotation=rotation)
            case RestartLinkerd(scope=scope):
                return self._restart(ca, now, scope)
            case Activate(intermediate_ref=inter_ref):
                return self._activate(state, now, inter_ref)
            case StartRetiring():
                assert ca.rotation is not None
                rotation = replace(ca.rotation, retire_after=retire_after(state, now, s))
                return replace(ca, phase=Phase.RETIRING, phase_since=now, rotation=rotation)
            case Retire():
                return self._retire(ca, now)
            case IssueKongIntermediate(ref=ref):
                active = ca.active_root
                if active is None:
                    raise IssuanceError("no active trust anchor")
                inter = self._make_intermediate(ref, active, now)
                return replace(ca.with_intermediate(inter), serial=max(ca.serial, _serial(ref)))
            case StartOperation(operation=op_id):
                op = ca.operation(op_id)
                assert op is not None
                return ca.with_operation(replace(op, state=OpState.RUNNING))
            case FinishOperation(operation=op_id, ok=ok, reason=reason):
                op = ca.operation(op_id)
                assert op is not None
                done = OpState.SUCCEEDED if ok else OpState.FAILED
                return ca.with_operation(replace(op, state=done, result=reason, finished_at=now))

    def _make_intermediate(self, ref: str, root: RootEntry, now: datetime) -> IntermediateEntry:
        s = self.settings
        validity = capped_validity(
            now, s.kong.intermediate.lifetime, root.cert.not_valid_after_utc, s.rotation.clock_skew
        )
        subject = Subject(s.kong_intermediate_common_name)
        made = self.anchor.create_intermediate(ref, CA(root.ref, root.cert), subject, validity)
        _require(Kind.KONG_INTERMEDIATE, made.cert, root.cert)
        return IntermediateEntry(ref=made.ref, cert=made.cert, root_ref=root.ref, created_at=now)

    def _restart(self, ca: CaRecord, now: datetime, scope: str) -> CaRecord:
        """Journal the restart time first, then roll: a retry after a crash patches the same
        restartedAt again, which Kubernetes treats as no change."""
        assert ca.rotation is not None
        if self.rollout is None:
            raise IssuanceError("no Kubernetes access to restart Linkerd's workloads")
        rotation = ca.rotation
        if rotation.restart_at is None:
            rotation = replace(rotation, restart_at=now)
            ca = replace(ca, rotation=rotation)
            self._save_ca(ca)
        assert rotation.restart_at is not None
        rolled = self.rollout.restart(
            "all" if scope == "all" else "control-plane", rotation.restart_at
        )
        log.info("rolled %d Linkerd workload(s): %s", len(rolled), ", ".join(rolled) or "none")
        return replace(ca, rotation=replace(rotation, restarted=True))

    def _activate(self, state: State, now: datetime, inter_ref: str | None) -> CaRecord:
        ca = state.ca
        old, nxt = ca.active_root, ca.root(RootRole.NEXT)
        assert old is not None and nxt is not None and ca.rotation is not None
        record = ca
        inter: IntermediateEntry | None = None
        if inter_ref is not None:
            inter = self._make_intermediate(inter_ref, nxt, now)
            record = replace(
                record.with_intermediate(inter), serial=max(ca.serial, _serial(inter_ref))
            )
        self.anchor.set_default(CA(nxt.ref, nxt.cert), CA(inter.ref, inter.cert) if inter else None)
        published_until = max(
            (entry.cert.not_valid_after_utc for _, entry in state.credentials()), default=now
        )
        roles = {old.ref: RootRole.RETIRING, nxt.ref: RootRole.ACTIVE}
        return replace(
            record,
            roots=tuple(replace(r, role=roles.get(r.ref, r.role)) for r in record.roots),
            phase=Phase.ACTIVATED,
            phase_since=now,
            rotation=replace(ca.rotation, activated_at=now, old_chain_until=published_until),
        )

    def _retire(self, ca: CaRecord, now: datetime) -> CaRecord:
        """The old root leaves the journal (and so every bundle); it stays in the anchor."""
        active = ca.active_root
        assert active is not None and ca.rotation is not None
        record = replace(
            ca,
            roots=(active,),
            intermediates=tuple(i for i in ca.intermediates if i.root_ref == active.ref),
            phase=Phase.STEADY,
            phase_since=now,
            rotation=None,
        )
        op = ca.operation(ca.rotation.operation) if ca.rotation.operation else None
        if op is not None:
            record = record.with_operation(
                replace(
                    op,
                    state=OpState.SUCCEEDED,
                    result=f"rotated to {active.ref}",
                    finished_at=now,
                )
            )
        return record

    # --- renewals ----------------------------------------------------------------------------

    def _run_batch(
        self,
        steps: list[CredentialStep],
        state: State,
        now: datetime,
        result: PassResult,
        failed: set[str],
    ) -> State:
        """Issue every due credential with bounded concurrency, and journal each shard
        once, as soon as its last credential is issued (the issuing of the next shards
        goes on meanwhile)."""
        by_shard: dict[str, list[CredentialStep]] = {}
        for step in steps:
            by_shard.setdefault(shard_of(_credential_key(step)), []).append(step)

        def work(step: CredentialStep) -> IssuedEntry | None:
            return None if isinstance(step, DropKongClient) else self._issue(step, state, now)

        def fail(step: CredentialStep, exc: BaseException) -> None:
            kind, name, target = step_target(step, self.settings)
            action = type(step).__name__
            message = _describe(exc)  # contained per credential: the others go on
            log.error("%s %s failed: %s", action, name, message)
            result.steps.append(StepResult(kind, name, action, step.reason, message))
            result.errors.append(f"{kind.value} {name}: {message}")
            failed.add(target)

        created = False
        changes_made: dict[str, IssuedEntry | None] = {}
        with ThreadPoolExecutor(max_workers=self.settings.rotation.concurrency) as pool:
            # Submitted shard by shard, so shards complete one after another.
            futures = {
                shard: [(step, pool.submit(work, step)) for step in group]
                for shard, group in by_shard.items()
            }
            for shard, group_futures in futures.items():
                issued: list[tuple[CredentialStep, IssuedEntry | None]] = []
                for step, future in group_futures:
                    try:
                        issued.append((step, future.result()))
                    except Exception as exc:
                        fail(step, exc)
                if not issued:
                    continue
                changes = {_credential_key(step): entry for step, entry in issued}
                try:
                    version, revisions = self.journal.save_credentials(
                        shard, self._shard_versions.get(shard, 0), changes
                    )
                except Exception as exc:
                    for step, _ in issued:
                        fail(step, exc)
                    continue
                self._shard_versions[shard] = version
                for step, entry in issued:
                    key = _credential_key(step)
                    kind, name, _ = step_target(step, self.settings)
                    created = created or (
                        entry is not None and not self._credential_versions.get(key)
                    )
                    self._credential_versions[key] = revisions[key]
                    changes_made[key] = entry
                    log.info("%s %s: %s", type(step).__name__, name, step.reason)
                    result.steps.append(StepResult(kind, name, type(step).__name__, step.reason))
        state = state.with_credentials(changes_made)
        if created:
            # A credential made anew starts again at revision 1, below what an object
            # published from the one it replaces (a client dropped and re-added, a corrupt
            # shard removed) may carry. Saving the CA record moves the generation past it.
            state = self._record(state, state.ca, result, "moving the journal generation on")
        return state

    def _issue(self, step: CredentialStep, state: State, now: datetime) -> IssuedEntry:
        s = self.settings
        skew = s.rotation.clock_skew
        key = generate_key("ec-p256")
        if isinstance(step, IssueLinkerdIssuer):
            root = state.ca.active_root
            if root is None:
                raise IssuanceError("no active trust anchor")
            validity = capped_validity(
                now, s.linkerd.issuer.lifetime, root.cert.not_valid_after_utc, skew
            )
            subject = Subject(s.linkerd_issuer_common_name)
            signer = CA(root.ref, root.cert)
            cert = self.anchor.sign_ca(signer, build_csr(key, subject), subject, validity)
            _require(Kind.LINKERD_ISSUER, cert, root.cert)
            return IssuedEntry(cert, private_key_pem(key), root.ref, issued_at=now)
        assert isinstance(step, IssueKongClient)
        inter = state.ca.active_intermediate
        if inter is None:
            raise IssuanceError("no Kong intermediate to sign with")
        client = self._clients[step.name]
        validity = capped_validity(now, client.lifetime, inter.cert.not_valid_after_utc, skew)
        subject = client_subject(client)
        signer = CA(inter.ref, inter.cert)
        cert = self.anchor.sign_client(signer, build_csr(key, subject), subject, validity)
        _require(Kind.KONG_CLIENT, cert, inter.cert)
        return IssuedEntry(cert, private_key_pem(key), inter.ref, (inter.cert,), now)

    # --- publishing and what it shows --------------------------------------------------------

    def _publish(
        self, world: TrustWorld, state: State, now: datetime, result: PassResult
    ) -> tuple[Observations, bool]:
        """Publish ``world`` everywhere; also whether every publisher accepted all of it."""
        observed = Observations(cluster=self.rollout is not None)
        if not self._still_current(result):
            return observed, False
        confirmed = True
        accepted = True
        for publisher in self.publishers:
            try:
                report = publisher.publish(world)
            except Exception as exc:  # one broken target must not stop the others
                log.error("publishing to %s failed: %s", publisher.description, exc)
                report = PublishReport(publisher.description, errors={"*": _describe(exc)})
            confirmed = confirmed and report.bundle_confirmed
            accepted = accepted and not report.errors
            result.reports.append(report)
            changed = result.published.setdefault(publisher.description, [])
            changed += report.changed
            if report.changed:
                log.info("published to %s: %s", publisher.description, ", ".join(report.changed))
            for obj in report.drifted:
                log.warning(
                    "drift in %s: %s was changed by someone else; repaired", report.target, obj
                )
            for obj, error in report.errors.items():
                result.errors.append(f"publish to {report.target}: {obj}: {error}")
        bundle = bundle_hash(world.bundle_pem)
        observations = Observations(
            bundle=bundle if confirmed else None,
            pending_pods=self._pending_pods(world, state, bundle, result),
            cluster=self.rollout is not None,
        )
        return observations, accepted

    def _note_published(
        self, state: State, world: TrustWorld, now: datetime, result: PassResult
    ) -> State:
        """Journal that every object of ``world`` is out, once per new content (a steady
        pass writes nothing): the replica that leads next can then tell an object deleted
        by someone from one never published."""
        newest = newest_content(world)
        noted = state.ca.published_at
        if newest is None or (noted is not None and noted >= newest):
            return state
        # Never before the content itself (another replica's clock may be ahead of ours),
        # or every pass would note it again.
        record = replace(state.ca, published_at=max(now, newest))
        return self._record(state, record, result, "noting what is published")

    def _still_current(self, result: PassResult) -> bool:
        """Whether the CA record is still the version this pass decided on. Another writer
        (a second process, a replica that still thinks it leads) may have moved on; then
        publishing this pass's older state would take the world back, so it is skipped."""
        try:
            _, current = self.journal.load_ca()
        except Exception as exc:
            result.errors.append(f"checking the journal before publishing: {_describe(exc)}")
            return False
        if current == self._version:
            return True
        result.errors.append(
            f"{self.journal.description}: version {current} was saved by another writer "
            f"(this pass decided on {self._version}); not publishing an older state"
        )
        return False

    def _pending_pods(
        self, world: TrustWorld, state: State, bundle: str, result: PassResult
    ) -> tuple[str, ...] | None:
        """Meshed Pods still on an old bundle; asked only while propagating, after the
        two-root bundle was confirmed and Linkerd was rolled."""
        rotation = state.ca.rotation
        linkerd = self.settings.linkerd
        if (
            self.rollout is None
            or not linkerd.enabled
            or linkerd.gate != "pods"
            or state.ca.phase is not Phase.PROPAGATING
            or rotation is None
            or rotation.confirmed_at is None
            or (linkerd.restart != "none" and not rotation.restarted)
        ):
            return None
        try:
            pending = self.rollout.pending_pods(world.bundle_pem, rotation.confirmed_at)
        except Exception as exc:
            result.errors.append(f"checking meshed pods: {_describe(exc)}")
            return None
        if pending:
            self.rollout.report_pending(pending, bundle)
        result.pending_pods = tuple(pending)
        return result.pending_pods

    def _record_pending(
        self, state: State, pending: tuple[str, ...] | None, result: PassResult
    ) -> State:
        """Name the lagging Pods in the journal too, so `status` shows them without the API."""
        rotation = state.ca.rotation
        if pending is None or rotation is None:
            return state
        shown = pending[:_PENDING_SHOWN]
        if (rotation.pending_pods, rotation.pending_count) == (shown, len(pending)):
            return state
        record = replace(
            state.ca,
            rotation=replace(rotation, pending_pods=shown, pending_count=len(pending)),
        )
        return self._record(state, record, result, "recording pending pods")

    def _record(self, state: State, record: CaRecord, result: PassResult, what: str) -> State:
        """Save a CA record that only notes facts (nothing depends on it this pass): a
        failure is reported, and the pass goes on with the state it had."""
        try:
            self._save_ca(record)
        except Exception as exc:
            result.errors.append(f"{what}: {_describe(exc)}")
            return state
        return replace(state, ca=record)

    # --- operations --------------------------------------------------------------------------

    def _fail_operations(self, state: State, now: datetime, result: PassResult) -> State:
        """A running manual operation whose target failed this pass ends as failed."""
        errors = [s for s in result.steps if not s.ok]
        record = state.ca
        for op in state.ca.operations:
            if op.state is not OpState.RUNNING or op.target in ROOT_TARGETS:
                continue
            hit = [
                s
                for s in errors
                if (target := step_target_name(s)) is not None and covers(op.target, target)
            ]
            if not hit:
                continue
            message = "; ".join(f"{s.kind.value} {s.name}: {s.error}" for s in hit[:5])
            record = record.with_operation(
                replace(op, state=OpState.FAILED, result=message, finished_at=now)
            )
        if record is state.ca:
            return state
        return self._record(state, record, result, "recording failed operations")


def step_target_name(step: StepResult) -> str | None:
    """The manual target a failed step belongs to."""
    if step.kind is Kind.LINKERD_ISSUER:
        return LINKERD_ISSUER
    if step.kind is Kind.KONG_CLIENT:
        return client_key(step.name)
    if step.kind is Kind.KONG_INTERMEDIATE:
        return KONG_INTERMEDIATE
    return None
