"""The steps ``plan`` decides and the engine carries out, and the targets they act on.

CA steps run one at a time, the journal saved after each; credential steps run in
batches; a ``Wait`` is no action but says what a root rotation waits for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ca_daemon.anchor.base import CA

TRUST_ANCHOR = "trust-anchor"
KONG_INTERMEDIATE = "kong-intermediate"
KONG = "kong"
ALL = "all"
# Targets that start a root rotation; they conflict with one already in progress.
ROOT_TARGETS = frozenset({TRUST_ANCHOR, ALL})
# The reason of a re-issue a manual request asked for (metrics count it as "manual").
MANUAL_ROTATION = "manual rotation"


# --- CA steps: one at a time, journal saved after each --------------------------------------


@dataclass(frozen=True)
class CreateRoot:
    ref: str
    reason: str


@dataclass(frozen=True)
class RebuildJournal:
    """The CA record is empty but the anchor holds named CAs: the journal was lost.
    Rebuilt from them (and the surviving credential records), never a fresh root."""

    cas: tuple[CA, ...]
    reason: str


@dataclass(frozen=True)
class AdvanceSerial:
    """The anchor holds a CA numbered more than one past the journal's count (a journal
    restored from an older backup): count on from there, so no name is made twice. The
    very next number is left alone: an interrupted step made it, and its retry reuses it."""

    to: int
    reason: str


@dataclass(frozen=True)
class PrepareRoot:
    ref: str
    reason: str
    operation: str | None = None


@dataclass(frozen=True)
class Propagate:
    reason: str = "publish the two-root bundle"


@dataclass(frozen=True)
class ConfirmBundle:
    bundle: str
    # When the publishers confirmed it (the propagation delay counts from then), which a
    # slow pass may reach well after the time it decided on.
    at: datetime | None = None
    reason: str = "every publisher holds the two-root bundle"


@dataclass(frozen=True)
class NoteRestart:
    """Journal the restartedAt Linkerd is about to be rolled with, before rolling."""

    scope: str  # "control-plane" | "all"
    reason: str = "Linkerd reads trust anchors only at start"


@dataclass(frozen=True)
class RestartLinkerd:
    scope: str  # "control-plane" | "all"
    reason: str = "Linkerd reads trust anchors only at start"


@dataclass(frozen=True)
class Activate:
    intermediate_ref: str | None
    reason: str = "the next root has propagated"


@dataclass(frozen=True)
class StartRetiring:
    reason: str = "everything is re-issued under the new root"


@dataclass(frozen=True)
class Retire:
    reason: str = "nothing under the old root can still be valid"


@dataclass(frozen=True)
class IssueKongIntermediate:
    ref: str
    reason: str


@dataclass(frozen=True)
class Revoke:
    """A revoking operation's client is re-issued and published: the certificates it
    replaced are revoked in the anchor, the CRLs fetched, and the operation finished."""

    operation: str
    reason: str = "the replaced certificate is revoked"


@dataclass(frozen=True)
class RefreshCrls:
    """The published CRLs near their next-update, or no longer those of the bundle's CAs."""

    reason: str


@dataclass(frozen=True)
class StartOperation:
    operation: str
    reason: str = "manual request"


@dataclass(frozen=True)
class FinishOperation:
    operation: str
    ok: bool
    reason: str


# --- credential steps: batched, one record written each -------------------------------------


@dataclass(frozen=True)
class IssueLinkerdIssuer:
    reason: str
    cluster: str | None = None  # a linked cluster's own issuer; None: home's


@dataclass(frozen=True)
class IssueKongClient:
    name: str
    reason: str


@dataclass(frozen=True)
class DropKongClient:
    name: str
    reason: str


@dataclass(frozen=True)
class Wait:
    """Not an action: what the root rotation waits for, and until when if that is known."""

    reason: str
    until: datetime | None = None
    # Only a publish can tell (which meshed Pods hold the bundle): the engine publishes
    # before renewing, or a credential renewed under the old root just before the
    # activation would be issued again under the new one in the same pass.
    after_publish: bool = False

    @property
    def text(self) -> str:
        """The reason with its deadline, as status and the API say it."""
        return (
            f"{self.reason} (until {self.until:%Y-%m-%dT%H:%M:%SZ})" if self.until else self.reason
        )


@dataclass(frozen=True)
class Refuse:
    """Not an action: the journal cannot be trusted as it is (it contradicts itself or the
    anchor). Nothing is signed or published; the pass fails with this reason."""

    reason: str


CaStep = (
    CreateRoot
    | RebuildJournal
    | AdvanceSerial
    | PrepareRoot
    | Propagate
    | ConfirmBundle
    | NoteRestart
    | RestartLinkerd
    | Activate
    | StartRetiring
    | Retire
    | IssueKongIntermediate
    | StartOperation
    | FinishOperation
    | Revoke
    | RefreshCrls
)
CredentialStep = IssueLinkerdIssuer | IssueKongClient | DropKongClient
Step = CaStep | CredentialStep | Wait | Refuse
CREDENTIAL_STEPS = (IssueLinkerdIssuer, IssueKongClient, DropKongClient)
# Steps that issue a certificate from the anchor: what ca_daemon_rotations_total counts.
ISSUING_STEPS = (
    CreateRoot,
    PrepareRoot,
    IssueKongIntermediate,
    IssueLinkerdIssuer,
    IssueKongClient,
)
