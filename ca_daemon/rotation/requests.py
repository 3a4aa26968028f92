"""Which manual rotation requests can be accepted: a known, enabled target, and never a
second root rotation while one is in progress."""

from __future__ import annotations

from ca_daemon.config.settings import Settings
from ca_daemon.errors import RequestError
from ca_daemon.model.state import LINKERD_ISSUER, CaRecord, Phase
from ca_daemon.rotation.steps import KONG, KONG_INTERMEDIATE, ROOT_TARGETS, TRUST_ANCHOR


class UnknownTarget(RequestError):
    pass


class RotationInProgress(RequestError):
    """The target conflicts with the root rotation in progress."""


def check_target(settings: Settings, target: str) -> None:
    """Raise UnknownTarget unless ``target`` names a part that is configured and enabled."""
    s = settings
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


def ensure_can_start_rotation(record: CaRecord, target: str) -> None:
    """Raise RotationInProgress when ``target`` would start a second root rotation."""
    if target in ROOT_TARGETS and record.phase is not Phase.STEADY:
        rotation = record.rotation
        when = "once it is back to steady"
        if rotation is not None and rotation.retire_after is not None:
            when = f"once the old root retires, at {rotation.retire_after:%Y-%m-%dT%H:%M:%SZ}"
        raise RotationInProgress(
            f"a root rotation is in progress (phase {record.phase.value}); "
            f"{target} can be requested {when}"
        )
