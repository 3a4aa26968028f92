"""The trust world every publisher writes and every reader (status, metrics) shows.

Derived from the persisted state alone, so publishing is a pure reconciliation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from cryptography import x509

from ca_daemon.config.settings import Settings
from ca_daemon.model.state import (
    LINKERD_ISSUER,
    IssuedEntry,
    State,
    client_key,
    issuer_key,
    trusted_roots,
)
from ca_daemon.pki.bundle import render_pem


@dataclass(frozen=True)
class TrustWorld:
    roots: tuple[x509.Certificate, ...]  # the trust bundle, oldest first
    linkerd_issuer: IssuedEntry | None = None
    kong_clients: Mapping[str, IssuedEntry] = field(default_factory=dict)
    # The journal's CA-record version this world was derived from (0: not known), so a
    # publisher can refuse to go back to an older one than it already published.
    generation: int = field(default=0, compare=False)
    # The journal's epoch: a new one starts whenever a lost journal is rebuilt.
    epoch: int = field(default=0, compare=False)
    # When every publisher last accepted a whole world, and since when the CA part of this
    # one has stood (the phase began): see published_before().
    published_at: datetime | None = field(default=None, compare=False)
    phase_since: datetime | None = field(default=None, compare=False)
    # Each credential's record version ("linkerd-issuer", "kong/<name>"), for the same
    # purpose per published object.
    versions: Mapping[str, int] = field(default_factory=dict, compare=False)
    # Configured credentials the journal holds none of ("linkerd-issuer", "kong/<name>"):
    # a first issue failed, maybe after a lost journal. Whatever was published for them
    # before stays as it is; a missing credential is no reason to unpublish one.
    kept: frozenset[str] = frozenset()
    # The CRLs of every CA in the bundle (PEM), once something was revoked: published
    # next to the bundle (crl.pem) for verifiers that check revocation.
    crls_pem: str | None = None
    # Each linked cluster's own Linkerd issuer and Kong clients, by their names there
    # (cluster_world() shows one cluster its own).
    cluster_issuers: Mapping[str, IssuedEntry] = field(default_factory=dict)
    cluster_clients: Mapping[str, Mapping[str, IssuedEntry]] = field(default_factory=dict)

    @property
    def bundle_pem(self) -> str:
        return render_pem(self.roots)


def desired_world(
    state: State,
    settings: Settings,
    generation: int = 0,
    versions: Mapping[str, int] | None = None,
) -> TrustWorld:
    kong = settings.kong.enabled
    configured = {c.name for c in settings.kong.clients}
    linkerd = settings.linkerd.enabled
    kept = {LINKERD_ISSUER} if linkerd and state.linkerd_issuer is None else set()
    if kong:
        kept |= {client_key(n) for n in configured - set(state.kong_clients)}
    linked = {c.name for c in settings.linked_clusters if settings.linked_linkerd(c).enabled}
    issuers = {n: e for n, e in state.cluster_issuers.items() if n in linked}
    cluster_clients: dict[str, dict[str, IssuedEntry]] = {}
    for cluster in settings.linked_clusters:
        own = settings.linked_kong(cluster)
        if not (kong and own.enabled):
            continue
        names = {c.name: f"{cluster.name}/{c.name}" for c in own.clients}
        cluster_clients[cluster.name] = {
            bare: entry for bare, full in names.items() if (entry := state.kong_clients.get(full))
        }
    return TrustWorld(
        roots=tuple(trusted_roots(state.ca)),
        linkerd_issuer=state.linkerd_issuer if linkerd else None,
        kong_clients=(
            {n: e for n, e in state.kong_clients.items() if n in configured} if kong else {}
        ),
        generation=generation,
        epoch=state.ca.epoch,
        published_at=state.ca.published_at,
        phase_since=state.ca.phase_since,
        versions=dict(versions or {}),
        kept=frozenset(kept),
        crls_pem=state.ca.crls.pem if state.ca.crls else None,
        cluster_issuers=issuers if linkerd else {},
        cluster_clients=cluster_clients,
    )


def cluster_world(world: TrustWorld, cluster: str) -> TrustWorld:
    """What a linked cluster is published: the shared bundle, its own issuer and its own
    Kong clients, as the home cluster's publisher would see its own (their names bare)."""
    issuer = world.cluster_issuers.get(cluster)
    clients = world.cluster_clients.get(cluster, {})
    own = {issuer_key(cluster): LINKERD_ISSUER}
    own |= {client_key(f"{cluster}/{name}"): client_key(name) for name in clients}
    return replace(
        world,
        linkerd_issuer=issuer,
        kong_clients=clients,
        versions={
            bare: world.versions[full] for full, bare in own.items() if full in world.versions
        },
        # What a credential not issued yet leaves in place is the directory's concern
        # (home's only): a Kubernetes publisher leaves an object it has nothing for alone.
        kept=frozenset(),
        cluster_issuers={},
        cluster_clients={},
    )


def published_before(world: TrustWorld, credential: IssuedEntry | None) -> bool:
    """Whether a full publish (journaled, so any replica knows it) already carried the
    object made of ``credential`` (None: of the CA part, which changes with the phase)."""
    if world.published_at is None:
        return False
    since = credential.issued if credential is not None else world.phase_since
    return since is None or since <= world.published_at


def newest_content(world: TrustWorld) -> datetime | None:
    """The latest moment anything in ``world`` came to be: once a full publish at or after
    it is journaled, every object of the world counts as published."""
    moments = [e.issued for e in world.kong_clients.values()]
    moments += [e.issued for e in world.cluster_issuers.values()]
    moments += [e.issued for clients in world.cluster_clients.values() for e in clients.values()]
    if world.linkerd_issuer is not None:
        moments.append(world.linkerd_issuer.issued)
    if world.phase_since is not None:
        moments.append(world.phase_since)
    return max(moments, default=None)
