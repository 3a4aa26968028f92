"""Which manual rotation requests can be accepted: a known, enabled target, and never a
second root rotation while one is in progress. An emergency (a key leaked) is asked of
the trust anchor or the Linkerd issuer only, and never joins a request already open."""

from __future__ import annotations

from ca_daemon.config.settings import Settings
from ca_daemon.errors import RequestError
from ca_daemon.model.state import ISSUER_PREFIX, LINKERD_ISSUER, CaRecord, Phase, issuer_key
from ca_daemon.rotation.steps import KONG, KONG_INTERMEDIATE, ROOT_TARGETS, TRUST_ANCHOR


class UnknownTarget(RequestError):
    pass


class RotationInProgress(RequestError):
    """The target conflicts with the root rotation in progress."""


def check_target(settings: Settings, target: str) -> None:
    """Raise UnknownTarget unless ``target`` names a part that is configured and enabled."""
    s = settings
    known = {c.name for c in s.kong_clients_everywhere}
    if target in (TRUST_ANCHOR, "all"):
        return
    if target == LINKERD_ISSUER and s.linkerd.enabled:
        return
    linked = {issuer_key(c.name) for c in s.linked_clusters if s.linked_linkerd(c).enabled}
    if target in linked and s.linkerd.enabled:
        return
    if target in (KONG_INTERMEDIATE, KONG) and s.kong.enabled:
        return
    if target.startswith("kong/") and s.kong.enabled and target[5:] in known:
        return
    raise UnknownTarget(
        f"unknown target {target!r}: one of trust-anchor, linkerd-issuer, "
        "linkerd-issuer/<linked cluster>, "
        "kong-intermediate, kong, kong/<configured client>, kong/<linked cluster>/<client>, "
        "all (parts that are enabled)"
    )


def ensure_can_start_rotation(record: CaRecord, target: str) -> None:
    """Raise RotationInProgress when ``target`` would start a second root rotation."""
    if target in ROOT_TARGETS and record.phase is not Phase.STEADY:
        rotation = record.rotation
        when = "once it is back to steady"
        if rotation is not None and rotation.proof:
            when = "once its old root is proven unused and retired (ca-daemon status)"
        elif rotation is not None and rotation.retire_after is not None:
            when = f"once the old root retires, at {rotation.retire_after:%Y-%m-%dT%H:%M:%SZ}"
        raise RotationInProgress(
            f"a root rotation is in progress (phase {record.phase.value}); "
            f"{target} can be requested {when}"
        )


# Linkerd proxies cannot be told to distrust one issuer: they trust whatever chains to a
# root in their bundle, so certificates a leaked issuer key signs stay valid until then.
LEAKED_ISSUER_ADVICE = (
    "the new issuer key signs from now on, but Linkerd proxies still accept certificates "
    "the leaked key signed (or signs) until the root it chains to leaves every bundle: only "
    "an emergency root rotation removes that trust (ca-daemon rotate trust-anchor "
    "--emergency --reason ...)"
)


def advice(target: str, emergency: bool) -> str | None:
    """What an operator must still know after this request is accepted (None: nothing)."""
    return LEAKED_ISSUER_ADVICE if emergency and _is_issuer(target) else None


def _is_issuer(target: str) -> bool:
    """The home cluster's Linkerd issuer, or a linked cluster's (checked by check_target)."""
    return target == LINKERD_ISSUER or target.startswith(ISSUER_PREFIX)


# What an emergency can be asked of: the root (retired on proof) and a Linkerd issuer (a
# new key now). A Kong client is revoked instead.


def ensure_can_start_emergency(record: CaRecord, target: str) -> None:
    """Raise UnknownTarget for a target an emergency does not apply to, and
    RotationInProgress when one for ``target`` (or any root rotation, for the root) is
    open already: an emergency is never merged into a request that may finish otherwise."""
    if target != TRUST_ANCHOR and not _is_issuer(target):
        raise UnknownTarget(
            "an emergency applies to trust-anchor or a Linkerd issuer (linkerd-issuer, "
            f"linkerd-issuer/<linked cluster>), not {target!r}"
        )
    roots = target == TRUST_ANCHOR
    for op in record.operations:
        if op.open and (op.target == target or (roots and op.target in ROOT_TARGETS)):
            kind = "an emergency" if op.emergency else "a"
            raise RotationInProgress(
                f"{kind} rotation of {op.target} is already {op.state.value} "
                f"(operation {op.id}); follow it with `ca-daemon status`"
            )
    if roots:
        ensure_can_start_rotation(record, target)


def ensure_can_revoke(record: CaRecord, target: str) -> None:
    """Raise UnknownTarget unless ``target`` is one Kong client, and RotationInProgress
    while a request for it is open: a revocation never joins a plain re-issue."""
    if not target.startswith("kong/"):
        raise UnknownTarget(
            f"a revocation applies to one Kong client (kong/<name>), not {target!r}"
        )
    for op in record.operations:
        if op.open and op.target == target:
            raise RotationInProgress(
                f"a rotation of {target} is already {op.state.value} (operation {op.id}); "
                "ask for the revocation once it has finished"
            )
