"""What the scheduler loop and the HTTP API share: one engine, its last pass, the metrics.

The loop calls ``tick``; the API asks for readiness, status, operations, and files
manual requests (journaled by the engine before they are acknowledged). On the leader
it then wakes the loop so a request is carried out now rather than at the next check;
a standby files requests too, into the shared journal, and the leader carries them out
at its next pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ca_daemon.config.settings import Settings
from ca_daemon.errors import JournalError, ServiceError
from ca_daemon.model.state import Operation, OpState, Rotation, State
from ca_daemon.model.world import desired_world
from ca_daemon.publish.directory import desired_files
from ca_daemon.publish.k8s_objects import desired_objects
from ca_daemon.report.forecast import rotation_path
from ca_daemon.report.status import (
    clusters_view,
    operation_view,
    optional_iso,
    status_view,
    waiting_for,
)
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.plan import Observations, covers, plan, restart_scope
from ca_daemon.rotation.requests import (
    check_target,
    ensure_can_revoke,
    ensure_can_start_emergency,
    ensure_can_start_rotation,
)
from ca_daemon.rotation.results import PassResult, step_target
from ca_daemon.rotation.steps import ROOT_TARGETS, Wait
from ca_daemon.service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leadership:
    """Who runs the engine: this process, or (on a standby) the named other one."""

    leader: bool = True
    holder: str | None = None


class JournalOffline(ServiceError):
    """The journal could not be read or written just now; ``journal`` names it.

    The API answers 503: a later call may well succeed, and nothing was changed.
    """

    def __init__(self, journal: str, error: JournalError) -> None:
        super().__init__(f"journal unavailable: {error}")  # the error names the journal
        self.journal = journal


class DaemonService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        metrics: Metrics,
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.clock = clock
        self._leadership: Callable[[], Leadership] = Leadership
        self._lock = threading.Lock()
        self._last: PassResult | None = None
        self._known: State | None = None  # the last state a pass loaded
        self._not_ready = "the first pass has not run yet"
        self._wake: Callable[[], None] = lambda: None

    # --- the loop side ------------------------------------------------------------------

    @property
    def leadership(self) -> Leadership:
        """Asked afresh each time (of the leader elector, when there is one)."""
        return self._leadership()

    @leadership.setter
    def leadership(self, value: Leadership) -> None:
        self._leadership = lambda: value

    def follow_leadership(self, source: Callable[[], Leadership]) -> None:
        """Ask ``source`` (the leader elector) who leads, before every pass and request."""
        self._leadership = source

    def on_wake(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def wake(self) -> None:
        """Run a pass now (a manual request, or this process just became the leader)."""
        self._wake()

    def tick(self, now: datetime | None = None) -> PassResult:
        now = now or self.clock()
        if not self.leadership.leader:
            return self._standby(now)
        result = self.engine.reconcile(now=now, on_loaded=self._loaded)
        for error in result.errors:
            log.error("%s", error)
        self.metrics.observe(result, self.settings, now)
        with self._lock:
            self._last = result
            self._known = result.state or self._known
            if result.state is not None and result.anchor_up:
                self._not_ready = ""
            elif self._not_ready:
                self._not_ready = "; ".join(result.errors) or "the anchor did not answer"
        return result

    def _loaded(self, state: State) -> None:
        """The pass loaded the journal and the anchor answered: ready now, not when the
        pass ends (a first issue at 5,000 clients takes about a minute)."""
        with self._lock:
            self._known = state
            self._not_ready = ""

    def _standby(self, now: datetime) -> PassResult:
        """Not the leader: no engine, no publishing; status and metrics from the journal."""
        result = PassResult()
        self.metrics.forget_clusters()  # what it said as leader, if it led
        try:
            result.state = self.engine.journal.load(migrate=False).state
        except Exception as exc:
            result.errors.append(f"loading state from {self.engine.journal.description}: {exc}")
            log.warning("standby: %s", result.errors[-1])
            with self._lock:
                if self._not_ready:
                    self._not_ready = result.errors[-1]
            return result
        self.metrics.observe_state(result.state, self.settings, now)
        with self._lock:
            self._last = result
            self._known = result.state
            self._not_ready = ""  # configuration and journal loaded
        return result

    # --- the API side -------------------------------------------------------------------

    def readiness(self) -> str | None:
        """None once configuration, anchor and journal were loaded; else why not."""
        with self._lock:
            return self._not_ready or None

    def _state(self) -> State:
        """The last pass's state with the CA record read afresh, so operations and the
        phase are current without reloading every credential."""
        with self._lock:
            base = self._known or State()
        try:
            record, _ = self.engine.journal.load_ca(migrate=False)
        except Exception as exc:  # the journal unreachable: what the last pass saw
            log.warning("status from the last pass: %s", exc)
            return base
        return replace(base, ca=record)

    def status(self) -> dict[str, Any]:
        now = self.clock()
        state = self._state()
        with self._lock:
            last = self._last
        view = status_view(state, self.settings, now, waiting=last.waiting if last else None)
        view["leader"] = self.leadership.holder if not self.leadership.leader else "self"
        # Per cluster, from the last pass's publish (a standby publishes nothing).
        lead = last is not None and self.leadership.leader
        reports = last.reports if last is not None and lead else []
        pending = list(state.ca.rotation.pending_pods) if state.ca.rotation else []
        view["clusters"] = clusters_view(self.settings, reports, pending, state, now)
        view["last_pass"] = (
            {"ok": last.ok, "errors": list(last.errors)}
            if last is not None and self.leadership.leader
            else None
        )
        return view

    def operation(self, op_id: str) -> dict[str, Any] | None:
        """The operation as journaled (raises JournalOffline).

        Unlike status, never from the last pass: an operation's state is what the
        caller waits on, and an old one would look like no progress, or a result that
        is not the latest.
        """
        try:
            record, _ = self.engine.journal.load_ca(migrate=False)
        except JournalError as exc:
            raise JournalOffline(self.engine.journal.description, exc) from None
        op = record.operation(op_id)
        if op is None:
            return None
        view = operation_view(op)
        rotation = record.rotation
        if op.target in ROOT_TARGETS and rotation and rotation.operation == op.id:
            view["phase"] = record.phase.value
            with self._lock:
                last, known = self._last, self._known
            if last is not None and self.leadership.leader:
                view["waiting_for"] = last.waiting
            else:
                # A standby (or a leader before its first pass) says what the journal says,
                # in the leader's words: behind a Service, polls alternate between them.
                now = self.clock()
                view["waiting_for"] = waiting_for(
                    replace(known or State(), ca=record), self.settings, now
                )
            view["pending_pods"] = list(rotation.pending_pods)
            # Milestones: when the new root took over signing, and when the old one leaves
            # every bundle (known once everything was re-issued under the new root).
            view["activated_at"] = optional_iso(rotation.activated_at)
            view["retire_after"] = optional_iso(rotation.retire_after)
        return view

    def request(
        self, target: str, reason: str, emergency: bool = False, revoke: bool = False
    ) -> str:
        """Journal the request (raises engine.RequestError, JournalOffline); on the leader,
        wake the loop so that it is carried out now.

        A standby journals it too (behind a Service either replica answers) and does
        nothing else: no migration of the journal, no pass. The leader finds the request
        at its next pass, within ``rotation.check_interval``."""
        leader = self.leadership.leader
        try:
            op_id = self.engine.request_rotation(
                target, reason, migrate=leader, emergency=emergency, revoke=revoke
            )
        except JournalError as exc:
            raise JournalOffline(self.engine.journal.description, exc) from None
        if leader:
            self._wake()
        return op_id

    def dry_run(
        self, target: str, reason: str, emergency: bool = False, revoke: bool = False
    ) -> dict[str, Any]:
        """What this request would do now, without journaling it: the steps plan() would
        take, or, when ``target`` already has a queued or running operation, that one
        (a real request is answered with it, 202; an emergency is refused, 409)."""
        check_target(self.settings, target)
        state = self._state()
        answer: dict[str, Any] = {"dry_run": True, "target": target, "steps": []}
        if emergency:
            ensure_can_start_emergency(state.ca, target)
            answer["emergency"] = True
        if revoke:
            ensure_can_revoke(state.ca, target)
            answer["revokes"] = [
                f"{entry.cert.serial_number:x}"
                for key, entry in state.credentials()
                if covers(target, key)
            ]
        for op in state.ca.operations:
            if op.open and op.target == target:
                return {**answer, "operation": op.id}
        now = self.clock()
        # A root request starts from the queue; any other is taken as running at once.
        started = OpState.QUEUED if target in ROOT_TARGETS else OpState.RUNNING
        op = Operation("dry-run", target, reason, now, started, emergency=emergency, revoke=revoke)
        if target in ROOT_TARGETS:
            ensure_can_start_rotation(state.ca, target)
        hypothetical = replace(state, ca=state.ca.with_operation(op))
        observations = Observations(cluster=self.engine.rollout is not None)
        steps = plan(hypothetical, now, self.settings, observations)
        summary = []
        for step in steps:
            if isinstance(step, Wait):
                continue
            kind, name, _ = step_target(step, self.settings)
            action = type(step).__name__
            summary.append(
                {"action": action, "kind": kind.value, "name": name, "reason": step.reason}
            )
        answer = {**answer, "steps": summary}
        if target in ROOT_TARGETS:
            # The whole way to the old root's retirement, dated, on a simulated clock.
            path = rotation_path(hypothetical, self.settings, now)
            answer["path"] = [event.to_json() for event in path]
            answer |= self._touches(hypothetical, now, emergency)
        return answer

    def _touches(self, state: State, now: datetime, emergency: bool) -> dict[str, Any]:
        """What a root rotation would touch: the objects it publishes, and in a cluster the
        workloads each of its Linkerd rolls restarts and the meshed Pods its gate waits for."""
        world = desired_world(state, self.settings)
        if self.settings.kubernetes_enabled:
            objects = [o.ref for o in desired_objects(world, self.settings)]
        else:
            objects = sorted(desired_files(world))
        found: dict[str, Any] = {"objects": objects}
        rollout = self.engine.rollout
        if rollout is None or not self.settings.linkerd.enabled:
            return found
        proof = emergency or self.settings.rotation.retire == "proof"
        rotation = Rotation(
            now, "manual", emergency=emergency, retire_on="proof" if proof else "expiry"
        )
        scope = restart_scope(rotation, self.settings)
        workloads, pods = ([], []) if scope == "none" else rollout.would_touch(scope)  # type: ignore[arg-type]
        found["rolls"] = {"scope": scope, "times": 3 if proof else 1, "workloads": workloads}
        found["pods"] = pods
        return found
