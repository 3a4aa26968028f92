"""Journal states to plan from."""

from __future__ import annotations

from dataclasses import replace

from ca_daemon.config.settings import Settings
from ca_daemon.model.state import (
    CaRecord,
    IntermediateEntry,
    IssuedEntry,
    Phase,
    RootEntry,
    RootRole,
    Rotation,
    State,
)
from ca_daemon.pki.keys import private_key_pem
from ca_daemon.pki.profiles import Kind, Subject
from ca_daemon.rotation.plan import client_subject
from tests.support.clock import NOW
from tests.support.pki import issue_profiled, self_signed_root


def steady_state(settings: Settings, root_days: int = 365) -> State:
    """A complete, freshly issued state at NOW."""
    root_key, root = self_signed_root(days=root_days)
    issuer_key, issuer = issue_profiled(
        Kind.LINKERD_ISSUER,
        Subject(settings.linkerd_issuer_common_name),
        root_key,
        root,
        settings.linkerd.issuer.lifetime,
    )
    inter_key, inter = issue_profiled(
        Kind.KONG_INTERMEDIATE, Subject("kong"), root_key, root, settings.kong.intermediate.lifetime
    )
    clients = {}
    for client in settings.kong.clients:
        key, cert = issue_profiled(
            Kind.KONG_CLIENT, client_subject(client), inter_key, inter, client.lifetime
        )
        clients[client.name] = IssuedEntry(cert, private_key_pem(key), "kong-2", (inter,))
    record = CaRecord(
        phase_since=NOW,
        serial=2,
        roots=(RootEntry("root-1", root, RootRole.ACTIVE),),
        intermediates=(IntermediateEntry("kong-2", inter, "root-1"),),
    )
    return State(
        ca=record,
        linkerd_issuer=IssuedEntry(issuer, private_key_pem(issuer_key), "root-1"),
        kong_clients=clients,
    )


def with_next_root(state: State, phase: Phase, **rotation: object) -> State:
    """``state`` with a next root (root-3) in ``phase`` of a rotation started at NOW."""
    _, nxt = self_signed_root("next")
    record = replace(
        state.ca,
        serial=3,
        roots=(*state.ca.roots, RootEntry("root-3", nxt, RootRole.NEXT, NOW)),
        phase=phase,
        phase_since=NOW,
        rotation=Rotation(started_at=NOW, trigger="schedule", **rotation),  # type: ignore[arg-type]
    )
    return replace(state, ca=record)
