"""Carry out the plan: CA steps one at a time, renewals in batches, journal before effects.

A pass loads the journal, asks ``plan`` what is needed, performs the first CA step
(``ca_steps.apply``), journals the record it returns (check-and-set) and asks again.
When only renewals are left they run in parallel batches, each write group journaled
as soon as it is complete. Then the trust world derived from the saved state is
published, and what the publishers confirmed (and, during a root rotation, which meshed
Pods lag) is fed back into ``plan``: that is how a rotation advances on journaled facts.
A failure anywhere leaves the previous, valid credentials published; a crash anywhere
resumes from the journal. The engine is the only writer of the journal during a pass:
``_write_ca`` and ``_write_credentials`` are the two places it does so.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import takewhile

from ca_daemon.anchor.base import CA, Anchor, existing_cas
from ca_daemon.config.settings import Settings
from ca_daemon.errors import JournalConflict, JournalError
from ca_daemon.journal.journal import Journal, Seen
from ca_daemon.model.state import (
    CaRecord,
    IssuedEntry,
    IssuerAnswer,
    Operation,
    OpState,
    State,
    client_key,
    issuer_key,
)
from ca_daemon.model.world import TrustWorld, desired_world, newest_content
from ca_daemon.pki.bundle import bundle_hash, certificate_pem
from ca_daemon.publish.base import Publisher, PublishReport, Rollout
from ca_daemon.publish.clusters import ClusterRollouts, report_of
from ca_daemon.rotation import ca_steps
from ca_daemon.rotation.issuer_confirmation import asks, confirmation, issuer_serial
from ca_daemon.rotation.plan import Observations, covers, gate_query, plan
from ca_daemon.rotation.renewals import Issue, credential_key, issue
from ca_daemon.rotation.requests import (
    check_target,
    ensure_can_revoke,
    ensure_can_start_emergency,
    ensure_can_start_rotation,
)
from ca_daemon.rotation.results import (
    CRLS,
    ROTATION,
    PassResult,
    StepResult,
    is_manual,
    step_target,
    step_target_name,
)
from ca_daemon.rotation.steps import (
    CREDENTIAL_STEPS,
    ISSUING_STEPS,
    KONG_INTERMEDIATE,
    ROOT_TARGETS,
    TRUST_ANCHOR,
    CaStep,
    CredentialStep,
    DropKongClient,
    FinishOperation,
    IssueKongClient,
    IssueKongIntermediate,
    IssueLinkerdIssuer,
    RebuildJournal,
    RefreshCrls,
    Refuse,
    Revoke,
    StartOperation,
    Step,
    Wait,
)

log = logging.getLogger(__name__)

# Each round executes a step or publishes; a root rotation needs at most a dozen in
# one pass. Reaching this means plan() is not converging: a bug, reported as an error.
_MAX_ROUNDS = 50
_PENDING_SHOWN = 20
_ANSWER_SHOWN = 1024  # of the identity controller's message, as an Event note holds
_NOTING = "noting Linkerd's issuer"
_BOOKKEEPING = (StartOperation, FinishOperation)


@dataclass
class _Pass:
    """What one pass loaded and what it did so far; nothing of it outlives the pass."""

    now: datetime
    # This process's clock when the pass began (``now`` may be a request's, later): a
    # rebuilt journal's epoch comes from it. From a request's clock, a second rebuild
    # in the same seconds could get a lower epoch, and publishers would refuse it for good.
    read_at: datetime
    result: PassResult
    seen: Seen
    clocked: bool = True  # time comes from the engine's clock, read again as it moves on
    failed: set[str] = field(default_factory=set)  # targets that failed: what they sign waits
    refused: bool = False  # the journal contradicts itself or the anchor: publish nothing


def _blocked(step: Step, failed: set[str]) -> bool:
    """Skip a step whose own target, or anything it is signed under, failed this pass."""
    if TRUST_ANCHOR in failed:
        return True
    match step:
        case IssueKongClient(name=name) | DropKongClient(name=name):
            return KONG_INTERMEDIATE in failed or client_key(name) in failed
        case IssueKongIntermediate():
            return KONG_INTERMEDIATE in failed
        case IssueLinkerdIssuer(cluster=cluster):
            return issuer_key(cluster) in failed
        case Wait():
            return False
        case StartOperation(operation=op) | FinishOperation(operation=op) | Revoke(operation=op):
            return f"operation/{op}" in failed
        case RefreshCrls():
            return CRLS in failed
        case _:
            return ROTATION in failed


def _outlived(state: State, changes: dict[str, IssuedEntry | None]) -> datetime | None:
    """A new ``outlived_until`` when a replaced or dropped credential ends later than
    what replaces it (a shortened lifetime); None when nothing outlives its replacement."""
    until = state.ca.outlived_until
    for key, entry in changes.items():
        before = state.credential(key)
        if before is None:
            continue
        end = before.cert.not_valid_after_utc
        replaced_sooner = entry is None or end > entry.cert.not_valid_after_utc
        if replaced_sooner and (until is None or end > until):
            until = end
    return until if until != state.ca.outlived_until else None


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
        issue: Issue = issue,
    ) -> None:
        self.settings = settings
        self.anchor = anchor
        self.journal = journal
        self.publishers = list(publishers)
        self.clock = clock
        self.rollout = rollout
        self._issue = issue
        self._last_state: State | None = None  # as last loaded: what is due if a load fails
        self._requests = threading.Lock()
        # The CA record (epoch, version) last found to agree with the anchor's CAs: a
        # cache, so the anchor is listed once per change of the record, not every pass.
        # The epoch too: a rebuilt journal's versions may start over.
        self._cross_checked: tuple[int, int] | None = None
        # By name: a scan per issue would make a batch of N clients cost N².
        self._clients = {c.name: c for c in settings.kong_clients_everywhere}

    # --- manual requests ------------------------------------------------------------------

    def request_rotation(
        self,
        target: str,
        reason: str = "",
        now: datetime | None = None,
        *,
        migrate: bool = True,
        emergency: bool = False,
        revoke: bool = False,
    ) -> str:
        """Journal a manual rotation request and return its operation id.

        The request is saved before this returns, so a request accepted just before a
        crash is still carried out. A target that already has a queued or running
        operation gets that operation's id instead of a second one.

        Any replica may ask: the CA record is written with check-and-set, and the leader
        carries the request out at its next pass. ``migrate=False`` (a standby): the only
        write is the request itself; an older journal layout is refused, not moved.
        ``emergency`` (a key leaked) and ``revoke`` (a Kong client's key leaked: its
        certificate is revoked once re-issued) are refused while one for ``target`` is open.
        """
        check_target(self.settings, target)
        with self._requests:  # one at a time in this process: no check-and-set race here
            return self._request(target, reason, now, migrate, emergency, revoke)

    def _request(
        self,
        target: str,
        reason: str,
        now: datetime | None,
        migrate: bool,
        emergency: bool,
        revoke: bool = False,
    ) -> str:
        for _ in range(5):
            record, version = self.journal.load_ca_to_update(migrate)
            if emergency:
                ensure_can_start_emergency(record, target)
            revoking: tuple[str, ...] = ()
            if revoke:
                ensure_can_revoke(record, target)
                # The certificate to revoke is the one published now, noted with the
                # request: a renewal before the request is carried out must not hide it.
                entry = self.journal.load_credential(target)
                revoking = (certificate_pem(entry.cert),) if entry is not None else ()
            for op in record.operations:
                if op.open and op.target == target:
                    return op.id
            ensure_can_start_rotation(record, target)
            op = Operation(
                id=uuid.uuid4().hex,
                target=target,
                reason=reason,
                requested_at=now or self.clock(),
                emergency=emergency,
                revoke=revoke,
                revoking=revoking,
            )
            try:
                self.journal.record_ca(Seen(version, {}, {}), record.with_operation(op))
            except JournalConflict:
                continue
            kind = "emergency" if emergency else "manual"
            log.info("%s rotation of %s requested (operation %s): %s", kind, target, op.id, reason)
            return op.id
        raise JournalError(f"{self.journal.description}: kept changing while saving the request")

    # --- one pass -------------------------------------------------------------------------

    def reconcile(
        self, now: datetime | None = None, on_loaded: Callable[[State], None] | None = None
    ) -> PassResult:
        """Issue what is missing or due, advance a root rotation, save, publish.

        ``on_loaded`` is called with the state as loaded once the journal was read and the
        anchor answered, before anything is done: a first issue of thousands of clients
        takes a minute, and the daemon is ready (it can answer for the journal) long
        before it ends."""
        clocked = now is None  # a caller's fixed ``now`` also stands for later moments
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
        p = _Pass(max([now, *requested]), now, result, loaded.seen(), clocked=clocked)
        try:
            self.anchor.check()
            result.anchor_up = True
        except Exception as exc:
            result.errors.append(_describe(exc))
        if result.anchor_up and on_loaded is not None:
            on_loaded(state)
        if result.anchor_up:
            state = self._confirm_issuer(p, state)

        published: TrustWorld | None = None
        if result.anchor_up:
            state, published = self._advance(p, state)
        if published is None and state.ca.active_root is not None and not p.refused:
            world = self._world(p, state)
            first = len(result.reports)
            _, accepted = self._publish(p, world, state)
            if result.anchor_up:
                state = self._note_published(p, state, world, result.reports[first:], accepted)
        state = self._fail_operations(p, state)
        if not result.anchor_up:
            self._note_blocked(state, p.now, result)
        result.state = state
        return result

    def _world(self, p: _Pass, state: State) -> TrustWorld:
        return desired_world(state, self.settings, p.seen.version, p.seen.revisions)

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
            result.steps.append(StepResult(step, kind, name, why, is_manual(step)))

    def _advance(self, p: _Pass, state: State) -> tuple[State, TrustWorld | None]:
        observations = Observations(
            cluster=self.rollout is not None,
            anchor_cas=self._anchor_cas(p, state),
            before_publish=True,
        )
        published: TrustWorld | None = None
        for _ in range(_MAX_ROUNDS):
            steps = [
                s
                for s in plan(state, p.now, self.settings, observations)
                if not _blocked(s, p.failed)
            ]
            refused = next((s for s in steps if isinstance(s, Refuse)), None)
            if refused is not None:
                log.error("the journal cannot be trusted: %s", refused.reason)
                p.result.errors.append(f"journal: {refused.reason}")
                p.failed.add(TRUST_ANCHOR)
                p.refused = True
                return state, published
            if observations.anchor_cas is not None:
                # Listed for the record as loaded; the steps below change both.
                self._cross_checked = (state.ca.epoch, p.seen.version)
                observations = replace(observations, anchor_cas=None)
            p.result.waiting = next((s.text for s in steps if isinstance(s, Wait)), None)
            ca_steps_due = [
                s for s in steps if not isinstance(s, (Wait, Refuse, *CREDENTIAL_STEPS))
            ]
            if ca_steps_due:
                # Operations starting or finishing change nothing but their own entries:
                # all of a round's are journaled in one write, so many queued requests
                # cost one round, not two each.
                group = list(takewhile(lambda s: isinstance(s, _BOOKKEEPING), ca_steps_due))
                try:
                    state = self._run_ca_steps(p, group or ca_steps_due[:1], state)
                except JournalConflict as exc:
                    p.result.errors.append(
                        f"{self.journal.description}: changed by another writer ({exc}); "
                        "this pass stops and the next one decides again"
                    )
                    return state, published
                continue
            renewals = [s for s in steps if isinstance(s, CREDENTIAL_STEPS)]
            observe_first = published is None and any(
                isinstance(s, Wait) and s.after_publish for s in steps
            )
            if renewals and not observe_first:
                state = self._run_batch(p, renewals, state)
                continue
            if state.ca.active_root is None:
                return state, published
            world = self._world(p, state)
            if world == published:
                return state, published
            first = len(p.result.reports)
            before = state
            observations, accepted = self._publish(p, world, state)
            state = self._record_pending(p, state, observations.pending_pods)
            state = self._note_published(p, state, world, p.result.reports[first:], accepted)
            published = world
            if not renewals and state is before and state.ca.rotation is None:
                # Outside a root rotation plan() reads nothing a publish observes (the
                # bundle confirmed, lagging Pods): planning the same state again would
                # decide the same (at 5,000 clients, ~0.4 s of a steady pass).
                return state, published
        p.result.errors.append(f"the pass did not settle in {_MAX_ROUNDS} rounds; stopped")
        return state, published

    # --- CA steps --------------------------------------------------------------------------

    def _run_ca_steps(self, p: _Pass, steps: list[CaStep], state: State) -> State:
        """Carry out ``steps`` one after another on the record, then journal it once."""
        record = state.ca
        try:
            for step in steps:
                at = p.read_at if isinstance(step, RebuildJournal) else p.now
                record = ca_steps.apply(
                    step, replace(state, ca=record), at, self.anchor, self.settings, self.rollout
                )
            self._write_ca(p, record)
        except JournalConflict:
            raise
        except Exception as exc:  # one broken step must not stop the others
            for step in steps:
                self._failed(p, step, exc)
            return state
        for step in steps:
            kind, name, _ = step_target(step, self.settings)
            log.info("%s %s: %s", type(step).__name__, name, step.reason)
            p.result.steps.append(StepResult(step, kind, name, manual=is_manual(step)))
        return replace(state, ca=record)

    def _failed(self, p: _Pass, step: CaStep | CredentialStep, exc: BaseException) -> None:
        kind, name, target = step_target(step, self.settings)
        message = _describe(exc)  # contained: the steps that do not depend on it go on
        log.error("%s %s failed: %s", type(step).__name__, name, message)
        p.result.steps.append(StepResult(step, kind, name, message, is_manual(step)))
        p.result.errors.append(f"{kind.value} {name}: {message}")
        p.failed.add(target)

    def _anchor_cas(self, p: _Pass, state: State) -> tuple[CA, ...] | None:
        """The anchor's named CAs when the CA record is empty (lost, or a first start): a
        backend that cannot tell stops the pass rather than risk a fresh root. Else, once
        per CA-record version, to cross-check the journal against the anchor (None when
        it was already checked, or the backend cannot list its CAs just now)."""
        if state.ca.roots or state.ca.serial:
            if self._cross_checked == (state.ca.epoch, p.seen.version):
                return None
            try:
                listed = existing_cas(self.anchor)
            except Exception as exc:
                log.warning("cannot cross-check the journal against the anchor: %s", exc)
                return None
            return None if listed is None else tuple(listed)
        try:
            return tuple(existing_cas(self.anchor) or ())
        except Exception as exc:
            message = f"listing the CAs in {self.anchor.description}: {_describe(exc)}"
            p.result.errors.append(message)
            p.failed.add(TRUST_ANCHOR)
            return ()

    # --- the journal: the only two places a pass writes it ----------------------------------

    def _write_ca(self, p: _Pass, record: CaRecord) -> None:
        self.journal.record_ca(p.seen, record)

    def _write_credentials(
        self, p: _Pass, changes: dict[str, IssuedEntry | None]
    ) -> dict[str, int]:
        return self.journal.record_credentials(p.seen, changes)

    # --- renewals ----------------------------------------------------------------------------

    def _run_batch(self, p: _Pass, steps: list[CredentialStep], state: State) -> State:
        """Issue every due credential with bounded concurrency, and journal each write
        group once, as soon as its last credential is issued (the issuing of the next
        groups goes on meanwhile)."""
        by_key = {credential_key(step): step for step in steps}

        def work(step: CredentialStep) -> IssuedEntry | None:
            if isinstance(step, DropKongClient):
                return None
            return self._issue(step, state, p.now, self.anchor, self.settings, self._clients)

        created = False
        changes_made: dict[str, IssuedEntry | None] = {}
        with ThreadPoolExecutor(max_workers=self.settings.rotation.concurrency) as pool:
            # Submitted group by group, so groups complete one after another.
            futures = [
                [(by_key[key], pool.submit(work, by_key[key])) for key in group]
                for group in self.journal.write_groups(by_key)
            ]
            for group_futures in futures:
                issued: list[tuple[CredentialStep, IssuedEntry | None]] = []
                for step, future in group_futures:
                    try:
                        issued.append((step, future.result()))
                    except Exception as exc:
                        self._failed(p, step, exc)
                if not issued:
                    continue
                before = dict(p.seen.revisions)
                try:
                    self._write_credentials(
                        p, {credential_key(step): entry for step, entry in issued}
                    )
                except Exception as exc:
                    for step, _ in issued:
                        self._failed(p, step, exc)
                    continue
                for step, entry in issued:
                    key = credential_key(step)
                    kind, name, _ = step_target(step, self.settings)
                    created = created or (entry is not None and not before.get(key))
                    changes_made[key] = entry
                    log.info("%s %s: %s", type(step).__name__, name, step.reason)
                    p.result.steps.append(StepResult(step, kind, name, manual=is_manual(step)))
        outlived = _outlived(state, changes_made)
        state = state.with_credentials(changes_made)
        record = state.ca
        if outlived is not None:
            record = replace(record, outlived_until=outlived)
        if created or record is not state.ca:
            # A credential made anew starts again at revision 1, below what an object
            # published from the one it replaces (a client dropped and re-added, a corrupt
            # shard removed) may carry. Saving the CA record moves the generation past it
            # (and notes a replaced certificate that outlives its replacement).
            state = self._record(p, state, record, "noting the credentials issued")
        return state

    # --- publishing and what it shows --------------------------------------------------------

    def _publish(self, p: _Pass, world: TrustWorld, state: State) -> tuple[Observations, bool]:
        """Publish ``world`` everywhere; also whether every publisher accepted all of it."""
        result = p.result
        if not self._still_current(p):
            # Nothing was published, so nothing is known of any cluster: as before a publish.
            return Observations(cluster=self.rollout is not None, before_publish=True), False
        confirmed = True
        accepted = True
        first = len(result.reports)
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
            bundle_at=self.clock() if p.clocked else None,  # a slow pass confirms late
            pending_pods=self._pending_pods(p, world, state, bundle),
            cluster=self.rollout is not None,
            unconfirmed=tuple(r.cluster for r in p.result.reports[first:] if r.holds and r.cluster),
        )
        return observations, accepted

    def _note_published(
        self,
        p: _Pass,
        state: State,
        world: TrustWorld,
        reports: Sequence[PublishReport],
        accepted: bool,
    ) -> State:
        """Journal, in one write, what this publish put out: that every object of ``world``
        is out, once every publisher accepted all of it and once per new content (a steady
        pass writes nothing), so that the replica leading next can tell an object deleted
        by someone from one never published; and when the journal's issuer first reached
        the cluster, from when Linkerd's answers about it count."""
        record = self._issuers_out(state, reports, p.now)
        newest = newest_content(world)
        noted = record.published_at
        if accepted and newest is not None and (noted is None or noted < newest):
            # Never before the content itself (another replica's clock may be ahead of
            # ours), or every pass would note it again.
            record = replace(record, published_at=max(p.now, newest))
        if record is state.ca:
            return state
        return self._record(p, state, record, "noting what is published")

    def _still_current(self, p: _Pass) -> bool:
        """Whether the CA record is still the version this pass decided on. Another writer
        (a second process, a replica that still thinks it leads) may have moved on; then
        publishing this pass's older state would take the world back, so it is skipped."""
        try:
            _, current = self.journal.load_ca()
        except Exception as exc:
            p.result.errors.append(f"checking the journal before publishing: {_describe(exc)}")
            return False
        if current == p.seen.version:
            return True
        p.result.errors.append(
            f"{self.journal.description}: version {current} was saved by another writer "
            f"(this pass decided on {p.seen.version}); not publishing an older state"
        )
        return False

    def _pending_pods(
        self, p: _Pass, world: TrustWorld, state: State, bundle: str
    ) -> tuple[str, ...] | None:
        """Meshed Pods that lag, asked only where a root rotation waits for them (once its
        stage's bundle was confirmed and Linkerd was rolled since)."""
        query = gate_query(state, self.settings)
        if self.rollout is None or query is None:
            return None
        try:
            pending = self.rollout.pending_pods(world.bundle_pem, query.since, query.restarted)
        except Exception as exc:
            p.result.errors.append(f"checking meshed pods: {_describe(exc)}")
            return None
        if pending:
            self.rollout.report_pending(pending, bundle)
        p.result.pending_pods = tuple(pending)
        return p.result.pending_pods

    def _record_pending(self, p: _Pass, state: State, pending: tuple[str, ...] | None) -> State:
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
        return self._record(p, state, record, "recording pending pods")

    def _record(self, p: _Pass, state: State, record: CaRecord, what: str) -> State:
        """Journal a CA record that only notes facts (nothing depends on it this pass): a
        failure is reported, and the pass goes on with the state it had."""
        try:
            self._write_ca(p, record)
        except Exception as exc:
            p.result.errors.append(f"{what}: {_describe(exc)}")
            return state
        return replace(state, ca=record)

    # --- Linkerd's answer about the issuer -----------------------------------------------------

    def _confirm_issuer(self, p: _Pass, state: State) -> State:
        """Ask Linkerd's identity controller about the issuer in the cluster, and journal
        its answer (every replica, and the rotation's retirement, decide on that). Asked
        until ``linkerd.confirm_timeout`` after it went out even once loaded: a replica of
        an HA control plane may still refuse it. A refusal, or a silence past the timeout,
        is reported. Each linked cluster's identity controller is asked about its own."""
        for linked, rollout in self._identity_controllers():
            state = self._confirm_one(p, state, linked, rollout)
        return state

    def _identity_controllers(self) -> list[tuple[str | None, Rollout]]:
        """(None for home, or a linked cluster's name) with the rollout that asks there."""
        if self.rollout is None:
            return []
        found: list[tuple[str | None, Rollout]] = [(None, self.rollout)]
        if isinstance(self.rollout, ClusterRollouts):
            for cluster in self.settings.linked_clusters:
                own = self.rollout.of(cluster.name)
                if own is not None:
                    found.append((cluster.name, own))
        return found

    def _confirm_one(self, p: _Pass, state: State, linked: str | None, rollout: Rollout) -> State:
        found = confirmation(state, self.settings, p.now, True, linked)
        record = state.ca.answer(linked)
        if found is None or record is None:
            return state
        where = f" in cluster {linked}" if linked else ""
        timeout = self.settings.linkerd_of(linked).confirm_timeout
        settled = found.state == "loaded" and p.now >= record.published_at + timeout
        if found.out and not settled:
            try:
                answer = rollout.issuer_answer(record.published_at)
            except Exception as exc:
                p.result.errors.append(f"asking Linkerd{where} about the issuer: {_describe(exc)}")
                return state
            heard = (answer.loaded, answer.at, answer.message[:_ANSWER_SHOWN]) if answer else None
            if heard is not None and heard != (record.loaded, record.at, record.message):
                loaded, at, message = heard
                if loaded:
                    log.info("Linkerd%s loaded issuer %s at %s", where, record.serial, at)
                else:
                    log.warning("Linkerd%s refused issuer %s: %s", where, record.serial, message)
                updated = replace(record, loaded=loaded, at=at, message=message)
                state = self._record(p, state, state.ca.with_answer(linked, updated), _NOTING)
                found = confirmation(state, self.settings, p.now, True, linked) or found
        rollout.report_issuer(found.text(p.now) if found.problem else None)
        return state

    def _issuers_out(
        self, state: State, reports: Sequence[PublishReport], now: datetime
    ) -> CaRecord:
        """The CA record noting each issuer this publish was the first to put out."""
        record = state.ca
        for linked, _ in self._identity_controllers():
            out = self._issuer_out(state, reports, now, linked)
            if out is not None:
                record = record.with_answer(linked, out)
        return record

    def _issuer_out(
        self,
        state: State,
        reports: Sequence[PublishReport],
        now: datetime,
        linked: str | None = None,
    ) -> IssuerAnswer | None:
        """A new record when this publish is the first to put the journal's issuer in the
        cluster (None: nothing to note). Linkerd's answers count from then on, never from
        before: it also reloads, and answers, when only the Secret's ca.crt changes. An
        issuer already there when the journal has no record at all (kept from before
        ca-daemon asked Linkerd) is taken as loaded."""
        issuer = state.issuer(linked)
        record = state.ca.answer(linked)
        if issuer is None or not asks(self.settings, True, linked):
            return None
        serial = issuer_serial(issuer.cert)
        if record is not None and record.serial == serial:
            return None
        linkerd = self.settings.linkerd_of(linked)
        ref = f"secret/{linkerd.namespace}/{linkerd.issuer_secret}"
        cluster = report_of(reports, linked)
        if cluster is None or "*" in cluster.errors or ref in cluster.errors:
            return None  # not out yet
        if ref in cluster.changed:
            return IssuerAnswer(serial, now)
        if record is None:
            return IssuerAnswer(serial, now, True, now, "already published: not asked")
        return IssuerAnswer(serial, issuer.issued)  # written by a pass that stopped short

    # --- operations --------------------------------------------------------------------------

    def _fail_operations(self, p: _Pass, state: State) -> State:
        """A running manual operation whose target failed this pass ends as failed."""
        errors = [s for s in p.result.steps if not s.ok]
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
                replace(op, state=OpState.FAILED, result=message, finished_at=p.now)
            )
        if record is state.ca:
            return state
        return self._record(p, state, record, "recording failed operations")
