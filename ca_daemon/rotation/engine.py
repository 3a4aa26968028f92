"""Carry out the plan: one step at a time, state saved after each, then publish.

The engine asks ``plan`` what is needed, performs the first step against the anchor,
saves the new state (check-and-set) and asks again. Publishing comes last and only
from saved state, so a failure anywhere leaves the previous, valid credentials
published, and a crash anywhere resumes from the journal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from cryptography import x509

from ca_daemon.anchor.base import CA, Anchor, AnchorError
from ca_daemon.config import Settings
from ca_daemon.pki.keys import generate_key, private_key_pem
from ca_daemon.pki.profiles import Kind, Subject, build_csr, capped_validity, check_profile
from ca_daemon.publish.base import Publisher, PublishReport
from ca_daemon.rotation.journal import Journal, JournalError
from ca_daemon.rotation.plan import (
    KONG_INTERMEDIATE,
    LINKERD_ISSUER,
    CreateRoot,
    DropKongClient,
    IssueKongClient,
    IssueKongIntermediate,
    IssueLinkerdIssuer,
    Step,
    client_subject,
    client_target,
    plan,
)
from ca_daemon.rotation.state import IntermediateEntry, IssuedEntry, RootEntry, RootRole, State
from ca_daemon.world import TrustWorld, desired_world

log = logging.getLogger(__name__)

# A pass never needs more steps than: a root, an intermediate, the issuer, each client.
_MAX_STEPS = 1000


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

    @property
    def ok(self) -> bool:
        return not self.errors


def step_target(step: Step, settings: Settings) -> tuple[Kind, str, str]:
    """(kind, stable name, force target) of a step; names stay the same across rotations."""
    match step:
        case CreateRoot(ref=ref):
            return Kind.TRUST_ANCHOR, ref, "trust-anchor"
        case IssueKongIntermediate():
            return Kind.KONG_INTERMEDIATE, "kong-intermediate", KONG_INTERMEDIATE
        case IssueLinkerdIssuer():
            return Kind.LINKERD_ISSUER, settings.linkerd.issuer_secret, LINKERD_ISSUER
        case IssueKongClient(name=name) | DropKongClient(name=name):
            return Kind.KONG_CLIENT, name, client_target(name)


class IssuanceError(Exception):
    """The anchor answered with a certificate the daemon will not publish."""


def _require(kind: Kind, cert: x509.Certificate, signer: x509.Certificate | None) -> None:
    problems = list(check_profile(kind, cert).problems)
    if signer is not None and cert.not_valid_after_utc > signer.not_valid_after_utc:
        problems.append("outlives its signer")
    if problems:
        raise IssuanceError(f"{kind.value} from the anchor is unusable: {'; '.join(problems)}")


def _serial(ref: str) -> int:
    return int(ref.rsplit("-", 1)[1])


class Engine:
    def __init__(
        self,
        settings: Settings,
        anchor: Anchor,
        journal: Journal,
        publishers: Sequence[Publisher],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.anchor = anchor
        self.journal = journal
        self.publishers = list(publishers)
        self.clock = clock

    # --- one pass -------------------------------------------------------------------------

    def reconcile(self, force: Collection[str] = (), now: datetime | None = None) -> PassResult:
        """Issue what is missing or due (and what ``force`` names), save, publish."""
        now = now or self.clock()
        result = PassResult()
        try:
            loaded = self.journal.load()
        except (JournalError, AnchorError) as exc:
            result.errors.append(f"loading state from {self.journal.description}: {exc}")
            return result
        state, version = loaded.state, loaded.version
        try:
            self.anchor.check()
            result.anchor_up = True
        except AnchorError as exc:
            result.errors.append(str(exc))
        if result.anchor_up:
            state = self._issue(state, version, now, set(force), result)
        result.state = state
        if state.active_root is not None:
            self._publish(desired_world(state, self.settings), result)
        return result

    def _issue(
        self, state: State, version: int, now: datetime, force: set[str], result: PassResult
    ) -> State:
        failed: set[str] = set()
        for _ in range(_MAX_STEPS):
            steps = [s for s in plan(state, now, self.settings, force) if not _blocked(s, failed)]
            if not steps:
                break
            step = steps[0]
            kind, name, target = step_target(step, self.settings)
            action = type(step).__name__
            try:
                new_state = self._execute(step, state, now)
                version = self.journal.save(new_state, version)
            except (AnchorError, JournalError, IssuanceError) as exc:
                log.error("%s %s failed: %s", action, name, exc)
                result.steps.append(StepResult(kind, name, action, step.reason, str(exc)))
                result.errors.append(f"{kind.value} {name}: {exc}")
                failed.add(target)
                if isinstance(exc, JournalError):
                    break
                continue
            state = new_state
            force.discard(target)
            log.info("%s %s: %s", action, name, step.reason)
            result.steps.append(StepResult(kind, name, action, step.reason))
        return state

    def _publish(self, world: TrustWorld, result: PassResult) -> None:
        for publisher in self.publishers:
            try:
                report = publisher.publish(world)
            except Exception as exc:  # one broken target must not stop the others
                log.error("publishing to %s failed: %s", publisher.description, exc)
                report = PublishReport(publisher.description, errors={"*": str(exc)})
            result.reports.append(report)
            result.published[publisher.description] = report.changed
            if report.changed:
                log.info("published to %s: %s", publisher.description, ", ".join(report.changed))
            for obj in report.drifted:
                log.warning(
                    "drift in %s: %s was changed by someone else; repaired", report.target, obj
                )
            for obj, error in report.errors.items():
                result.errors.append(f"publish to {report.target}: {obj}: {error}")

    # --- steps ------------------------------------------------------------------------------

    def _execute(self, step: Step, state: State, now: datetime) -> State:
        s = self.settings
        skew = s.rotation.clock_skew
        match step:
            case CreateRoot(ref=ref):
                validity = capped_validity(now, s.root.lifetime, None, skew)
                ca = self.anchor.create_root(ref, Subject(s.root_common_name), s.root.key, validity)
                _require(Kind.TRUST_ANCHOR, ca.cert, None)
                role = RootRole.ACTIVE if state.active_root is None else RootRole.NEXT
                return replace(
                    state,
                    roots=(*state.roots, RootEntry(ca.ref, ca.cert, role)),
                    serial=_serial(ref),
                    phase_since=state.phase_since or now,
                )
            case IssueKongIntermediate(ref=ref):
                root = self._active_root(state)
                validity = capped_validity(
                    now, s.kong.intermediate.lifetime, root.cert.not_valid_after_utc, skew
                )
                subject = Subject(s.kong_intermediate_common_name)
                ca = self.anchor.create_intermediate(ref, root, subject, validity)
                _require(Kind.KONG_INTERMEDIATE, ca.cert, root.cert)
                entry = IntermediateEntry(ref=ca.ref, cert=ca.cert, root_ref=root.ref)
                return replace(state, kong_intermediate=entry, serial=_serial(ref))
            case IssueLinkerdIssuer():
                root = self._active_root(state)
                validity = capped_validity(
                    now, s.linkerd.issuer.lifetime, root.cert.not_valid_after_utc, skew
                )
                key = generate_key("ec-p256")
                subject = Subject(s.linkerd_issuer_common_name)
                cert = self.anchor.sign_ca(root, build_csr(key, subject), subject, validity)
                _require(Kind.LINKERD_ISSUER, cert, root.cert)
                issued = IssuedEntry(cert=cert, key_pem=private_key_pem(key), signer_ref=root.ref)
                return replace(state, linkerd_issuer=issued)
            case IssueKongClient(name=name):
                inter = state.kong_intermediate
                if inter is None:
                    raise IssuanceError("no Kong intermediate to sign with")
                client = next(c for c in s.kong.clients if c.name == name)
                validity = capped_validity(
                    now, client.lifetime, inter.cert.not_valid_after_utc, skew
                )
                key = generate_key("ec-p256")
                subject = client_subject(client)
                signer = CA(inter.ref, inter.cert)
                cert = self.anchor.sign_client(signer, build_csr(key, subject), subject, validity)
                _require(Kind.KONG_CLIENT, cert, inter.cert)
                issued = IssuedEntry(
                    cert=cert,
                    key_pem=private_key_pem(key),
                    signer_ref=inter.ref,
                    chain=(inter.cert,),
                )
                return state.with_client(name, issued)
            case DropKongClient(name=name):
                return state.with_client(name, None)

    @staticmethod
    def _active_root(state: State) -> CA:
        root = state.active_root
        if root is None:
            raise IssuanceError("no active trust anchor")
        return CA(root.ref, root.cert)


def _blocked(step: Step, failed: set[str]) -> bool:
    """Skip a step whose own target, or anything it is signed under, failed this pass."""
    if "trust-anchor" in failed:
        return True
    if isinstance(step, IssueKongClient) and KONG_INTERMEDIATE in failed:
        return True
    match step:
        case IssueKongIntermediate():
            return KONG_INTERMEDIATE in failed
        case IssueLinkerdIssuer():
            return LINKERD_ISSUER in failed
        case IssueKongClient(name=name) | DropKongClient(name=name):
            return client_target(name) in failed
        case _:
            return False
