"""What a pass did, as typed values: each step with what it acted on, and the pass as a
whole. Serialised only at the edges (metrics, the API, the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ca_daemon.config.settings import Settings
from ca_daemon.model.state import ISSUER_PREFIX, LINKERD_ISSUER, State, client_key, issuer_key
from ca_daemon.pki.profiles import Kind
from ca_daemon.publish.base import PublishReport
from ca_daemon.rotation.steps import (
    KONG_INTERMEDIATE,
    MANUAL_ROTATION,
    TRUST_ANCHOR,
    Activate,
    AdvanceSerial,
    ConfirmBundle,
    CreateRoot,
    DropKongClient,
    FinishOperation,
    IssueKongClient,
    IssueKongIntermediate,
    IssueLinkerdIssuer,
    NoteRestart,
    PrepareRoot,
    Propagate,
    RebuildJournal,
    RefreshCrls,
    Refuse,
    RestartLinkerd,
    Retire,
    Revoke,
    StartOperation,
    StartRetiring,
    Step,
    Wait,
)

ROTATION = "root-rotation"  # the failure target of the root-rotation steps
CRLS = "crls"  # the failure target of making the CRLs anew


@dataclass(frozen=True)
class StepResult:
    """One step carried out (or failed: ``error``), with the kind and stable name of what
    it acted on. ``manual``: it serves a manual request rather than the schedule."""

    step: Step
    kind: Kind
    name: str
    error: str | None = None
    manual: bool = False

    @property
    def action(self) -> str:
        return type(self.step).__name__

    @property
    def reason(self) -> str:
        return self.step.reason

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
        case RebuildJournal() | AdvanceSerial():
            return Kind.TRUST_ANCHOR, "journal", TRUST_ANCHOR
        case PrepareRoot(ref=ref):
            return Kind.TRUST_ANCHOR, ref, ROTATION
        case (
            Propagate()
            | ConfirmBundle()
            | NoteRestart()
            | RestartLinkerd()
            | StartRetiring()
            | Retire()
            | Activate()
            | Wait()
            | Refuse()
        ):
            return Kind.TRUST_ANCHOR, "root-rotation", ROTATION
        case IssueKongIntermediate(ref=ref):
            # Named by its ref, as roots are, so metrics join with the certificate's series.
            return Kind.KONG_INTERMEDIATE, ref, KONG_INTERMEDIATE
        case StartOperation(operation=op) | FinishOperation(operation=op) | Revoke(operation=op):
            return Kind.TRUST_ANCHOR, f"operation {op}", f"operation/{op}"
        case RefreshCrls():
            return Kind.TRUST_ANCHOR, CRLS, CRLS
        case IssueLinkerdIssuer(cluster=cluster):
            if cluster is None:
                return Kind.LINKERD_ISSUER, settings.linkerd.issuer_secret, LINKERD_ISSUER
            # Named by the credential: every cluster's issuer Secret may have the same name.
            return Kind.LINKERD_ISSUER, issuer_key(cluster), issuer_key(cluster)
        case IssueKongClient(name=name) | DropKongClient(name=name):
            return Kind.KONG_CLIENT, name, client_key(name)


def is_manual(step: Step) -> bool:
    """Whether ``step`` serves a manual request rather than the schedule."""
    if isinstance(step, PrepareRoot):
        return step.operation is not None
    return getattr(step, "reason", None) == MANUAL_ROTATION


def step_target_name(step: StepResult) -> str | None:
    """The manual target a failed step belongs to."""
    if step.kind is Kind.LINKERD_ISSUER:
        return step.name if step.name.startswith(ISSUER_PREFIX) else LINKERD_ISSUER
    if step.kind is Kind.KONG_CLIENT:
        return client_key(step.name)
    if step.kind is Kind.KONG_INTERMEDIATE:
        return KONG_INTERMEDIATE
    return None
