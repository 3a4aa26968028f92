"""What must change now: a pure function of (state, observations, now, settings).

``plan`` is the rotator. It lists every step still needed, CA steps first in the
order they must run, then the renewals of issued credentials, then at most one
``Wait`` that says what the root rotation is waiting for. The engine carries out
the first CA step, saves, and asks again; renewals it carries out in batches. So
each step is decided on fresh, journaled facts and a crash resumes at the right
place.

Root rotation (SPEC "Root rotation"): steady → prepared (next root created in the
anchor, trusted by nobody yet) → propagating (bundle {active, next} published; once
every publisher confirmed it, Linkerd is rolled, then the propagation delay and the
pods gate are waited out) → activated (the next root signs: new Kong intermediate,
new Linkerd issuer, every client re-issued) → retiring (both roots stay until nothing
under the old chain can still be valid) → steady with the new root alone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ca_daemon.anchor.base import CA
from ca_daemon.config.settings import ClusterConfig, KongClient, LinkerdConfig, Settings
from ca_daemon.model.state import (
    KONG_PREFIX,
    CaRecord,
    IntermediateEntry,
    IssuedEntry,
    Operation,
    OpState,
    Phase,
    Rotation,
    State,
    client_key,
    issuer_key,
    trusted_roots,
)
from ca_daemon.pki.bundle import bundle_hash, fingerprint, render_pem
from ca_daemon.pki.profiles import Subject, subject_alt_names
from ca_daemon.rotation.checks import UNTRUSTED, journal_problems
from ca_daemon.rotation.issuer_confirmation import issuer_unconfirmed
from ca_daemon.rotation.rebuild import ca_number
from ca_daemon.rotation.requests import advice
from ca_daemon.rotation.steps import (
    ALL,
    KONG,
    KONG_INTERMEDIATE,
    MANUAL_ROTATION,
    ROOT_TARGETS,
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


@dataclass(frozen=True)
class Observations:
    """What the last publish showed, fed back into the decision."""

    bundle: str | None = None  # hash of the bundle *every* publisher confirmed; else None
    bundle_at: datetime | None = None  # when they had (the clock read after publishing)
    pending_pods: tuple[str, ...] | None = None  # meshed Pods lagging; None: not checked
    cluster: bool = False  # Linkerd's workloads can be rolled and gated (Kubernetes)
    # The anchor's named CAs when the engine listed them (None: not listed this pass):
    # while the CA record is empty (a lost journal), and whenever the record moved, to
    # cross-check it against what the anchor holds.
    anchor_cas: tuple[CA, ...] | None = None
    # Linked clusters in the rotation whose publish this pass did not confirm the bundle
    # (unreachable, or a write refused): each holds every phase move until it does.
    unconfirmed: tuple[str, ...] = ()
    # Planned before this pass published: what each cluster shows is not known yet.
    before_publish: bool = False


def renew_at(cert: x509.Certificate, rotate_before: timedelta, jitter: float) -> datetime:
    """When ``cert`` is due: ``rotate_before`` ahead of expiry, stretched by up to ``jitter``.

    The stretch comes from the certificate's fingerprint, so it is stable across runs and
    replicas while still spreading many certificates' renewals apart.
    """
    return cert.not_valid_after_utc - rotate_before * (1 + jitter * _spread(cert))


# A plan looks at every certificate on every pass; what it derives from one never
# changes. Bounded: a few entries per credential, old ones fall out.
_PER_CERTIFICATE = 16384


@functools.lru_cache(maxsize=_PER_CERTIFICATE)
def _spread(cert: x509.Certificate) -> float:
    return int(fingerprint(cert)[:8], 16) / 0xFFFFFFFF


@functools.lru_cache(maxsize=_PER_CERTIFICATE)
def _names(cert: x509.Certificate) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    # Read from a copy: the library keeps a certificate's parsed extensions on it for
    # good, ~2 KB a certificate held for nothing once the names are known.
    copy = x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER))
    have = subject_alt_names(copy)
    return have.common_name, tuple(sorted(have.dns_names)), tuple(sorted(have.uris))


def root_due_at(root: x509.Certificate, settings: Settings) -> datetime:
    return root.not_valid_after_utc - settings.root.rotate_before


def _due_reason(
    cert: x509.Certificate,
    now: datetime,
    rotate_before: timedelta,
    jitter: float,
    signer_not_after: datetime,
) -> str | None:
    if now < renew_at(cert, rotate_before, jitter):
        return None
    # Capped at the signer's end already: a new one would end no later, so renewing
    # would only churn. The signer's own rotation moves it on.
    if cert.not_valid_after_utc >= signer_not_after:
        return None
    left = cert.not_valid_after_utc - now
    return "expired" if left <= timedelta(0) else f"due: {_short(left)} left"


def _short(delta: timedelta) -> str:
    hours = int(delta.total_seconds() // 3600)
    return f"{hours}h" if hours else f"{int(delta.total_seconds() // 60)}m"


def client_subject(client: KongClient) -> Subject:
    """SANs for a Kong client; the common name is added as a DNS name, as Vault does by
    default, because TLS verifiers (webpki, cryptography) require a SAN on a leaf."""
    dns = list(client.dns_names)
    if client.common_name not in dns and _looks_like_hostname(client.common_name):
        dns.append(client.common_name)
    return Subject(client.common_name, tuple(dns), tuple(client.uris))


def _looks_like_hostname(name: str) -> bool:
    labels = name.split(".")
    return all(label and label.replace("-", "").isalnum() for label in labels)


def _same_subject(cert: x509.Certificate, want: Subject) -> bool:
    return _names(cert) == (
        want.common_name,
        tuple(sorted(want.dns_names)),
        tuple(sorted(want.uris)),
    )


def covers(target: str, credential: str) -> bool:
    """Whether a manual ``target`` asks for ``credential`` to be re-issued."""
    if target == ALL:
        return True
    if target == KONG:
        return credential.startswith(KONG_PREFIX)
    return target == credential


def _manual(running: list[Operation], key: str, issued: datetime) -> bool:
    return any(covers(op.target, key) and issued < op.requested_at for op in running)


@dataclass(frozen=True)
class _Signer:
    ref: str
    not_after: datetime | None  # None: the signer is itself still to be made


def plan(
    state: State,
    now: datetime,
    settings: Settings,
    observations: Observations = Observations(),
) -> list[Step]:
    """Every step needed to bring ``state`` up to date at ``now``, in order."""
    ca = state.ca
    steps: list[Step] = []
    serial = ca.serial
    running = [o for o in ca.operations if o.state is OpState.RUNNING]

    problems = journal_problems(state, observations.anchor_cas)
    if problems:
        return [Refuse(f"{'; '.join(problems)}. {UNTRUSTED}")]
    named = [n for n in map(ca_number, observations.anchor_cas or ()) if n]
    # serial + 1 may be a CA an interrupted step made and did not journal: the retry
    # takes it up again by name (that is how steps stay idempotent). Beyond that, the
    # journal is older than the anchor.
    if ca.roots and named and max(named) > ca.serial + 1:
        why = f"the anchor holds CAs numbered up to {max(named)}, the journal counted {ca.serial}"
        return [AdvanceSerial(to=max(named), reason=why)]
    root = ca.active_root
    if root is None and not ca.roots and ca.serial == 0 and observations.anchor_cas:
        names = ", ".join(c.ref for c in observations.anchor_cas)
        why = f"the CA record is missing but the anchor holds {names}"
        return [RebuildJournal(cas=observations.anchor_cas, reason=why)]
    if root is None:
        serial += 1
        steps.append(CreateRoot(ref=f"root-{serial}", reason="no trust anchor yet"))
        root_signer = _Signer(f"root-{serial}", None)
    else:
        root_signer = _Signer(root.ref, root.cert.not_valid_after_utc)
        steps += _root_rotation(state, now, settings, observations)
        steps += _operations(state, observations)
        steps += _crl_refresh(ca, now)

    issuer_steps = _issuer_steps(state, now, settings, root_signer, running)

    kong_steps: list[Step] = []
    if settings.kong.enabled:
        inter = ca.active_intermediate if root else None
        reason = None
        if inter is None:
            reason = "missing"
        elif _manual(running, KONG_INTERMEDIATE, _created(inter)):
            reason = MANUAL_ROTATION
        elif root is not None:
            reason = _due_reason(
                inter.cert,
                now,
                settings.kong.intermediate.rotate_before,
                settings.rotation.jitter,
                root.cert.not_valid_after_utc,
            )
        if reason or inter is None:
            serial += 1
            steps.append(IssueKongIntermediate(ref=f"kong-{serial}", reason=reason or "missing"))
            inter_signer = _Signer(f"kong-{serial}", None)
        else:
            inter_signer = _Signer(inter.ref, inter.cert.not_valid_after_utc)
        kong_steps = list(_client_steps(state, now, settings, inter_signer, running))

    waits = [s for s in steps if isinstance(s, Wait)]
    actions = [s for s in steps if not isinstance(s, Wait)]
    return [*actions, *issuer_steps, *kong_steps, *waits]


def _issuer_steps(
    state: State, now: datetime, settings: Settings, signer: _Signer, running: list[Operation]
) -> list[Step]:
    """The home cluster's Linkerd issuer and each linked cluster's, each on its own
    schedule: a linked cluster's renewal never waits on another cluster."""
    if not settings.linkerd.enabled:
        return []
    clusters: list[tuple[str | None, LinkerdConfig]] = [(None, settings.linkerd)]
    clusters += [(c.name, settings.linked_linkerd(c)) for c in settings.linked_clusters]
    steps: list[Step] = []
    for cluster, linkerd in clusters:
        if not linkerd.enabled:
            continue
        issuer = state.issuer(cluster)
        if cluster is not None and issuer is None and state.ca.phase is not Phase.STEADY:
            # Added during a root rotation: it gets the bundle now (and holds the rotation
            # until it confirms it), its issuer once the rotation ended, never one under
            # a root its control plane may not trust yet.
            continue
        reason = _reason(
            issuer,
            issuer_key(cluster),
            signer,
            linkerd.issuer.rotate_before,
            now,
            settings.rotation.jitter,
            running,
        )
        if reason is None and issuer and issuer.cert.subject != _cn_name(settings, cluster):
            reason = "common name changed"
        if reason:
            steps.append(IssueLinkerdIssuer(reason=reason, cluster=cluster))
    return steps


def _reason(
    entry: IssuedEntry | None,
    key: str,
    signer: _Signer,
    rotate_before: timedelta,
    now: datetime,
    jitter: float,
    running: list[Operation],
) -> str | None:
    if entry is None:
        return "missing"
    if _manual(running, key, entry.issued):
        return MANUAL_ROTATION
    if entry.signer_ref != signer.ref:
        return f"signed by {entry.signer_ref}, not {signer.ref}"
    if signer.not_after is None:
        return None
    return _due_reason(entry.cert, now, rotate_before, jitter, signer.not_after)


def _client_steps(
    state: State,
    now: datetime,
    settings: Settings,
    signer: _Signer,
    running: list[Operation],
) -> Iterator[Step]:
    configured = {c.name: c for c in settings.kong_clients_everywhere}
    for name, client in configured.items():
        entry = state.kong_clients.get(name)
        reason = _reason(
            entry,
            client_key(name),
            signer,
            client.rotate_before,
            now,
            settings.rotation.jitter,
            running,
        )
        if reason is None and entry and not _same_subject(entry.cert, client_subject(client)):
            reason = "subject changed in configuration"
        if reason:
            yield IssueKongClient(name=name, reason=reason)
    for name in sorted(set(state.kong_clients) - set(configured)):
        yield DropKongClient(name=name, reason="no longer configured")


def _root_rotation(
    state: State, now: datetime, settings: Settings, obs: Observations
) -> list[Step]:
    ca = state.ca
    root = ca.active_root
    assert root is not None
    rotation = ca.rotation
    if ca.phase is Phase.STEADY:
        manual = next(
            (o for o in ca.operations if o.state is OpState.QUEUED and o.target in ROOT_TARGETS),
            None,
        )
        due = now >= root_due_at(root.cert, settings)
        if manual is None and not due:
            return []
        left = root.cert.not_valid_after_utc - now
        reason = (
            f"manual: {manual.reason or manual.target}" if manual else f"due: {_short(left)} left"
        )
        return [
            PrepareRoot(
                ref=f"root-{ca.serial + 1}",
                reason=reason,
                operation=manual.id if manual else None,
            )
        ]
    assert rotation is not None, f"phase {ca.phase} without a rotation record"
    if ca.phase is not Phase.PREPARED and rotating_clusters(settings):
        if obs.before_publish:
            # A cluster that stopped answering must hold the rotation from this pass on,
            # not from the publish after a phase moved without it.
            return [Wait("asking every cluster before the rotation moves on", after_publish=True)]
        if obs.unconfirmed:
            names = ", ".join(obs.unconfirmed)
            return [
                Wait(f"cluster(s) not confirming the bundle (unreachable or refusing): {names}")
            ]
    if ca.phase is Phase.PREPARED:
        return [Propagate()]
    if ca.phase is Phase.PROPAGATING:
        return _propagating(state, now, settings, obs)
    if ca.phase is Phase.ACTIVATED:
        lagging = _under_old_chain(state, settings)
        if lagging:
            return [Wait(f"re-issuing under the new root: {lagging} credential(s) to go")]
        for linked in [None, *(c.name for c in rotating_clusters(settings, linkerd=True))]:
            unconfirmed = issuer_unconfirmed(state, settings, now, obs.cluster, linked)
            if unconfirmed is not None:
                return [Wait(unconfirmed)]
        if rotation.proof:
            return _prove_unused(state, now, settings, obs) or [StartRetiring()]
        return [StartRetiring()]
    if rotation.proof:
        # The bundle without the old root: confirmed, rolled out, and held by every Pod.
        what = "the bundle without the old root"
        return (
            _confirm_and_roll(state, now, settings, obs, what)
            or _pods_gate(settings, obs, rotation, TRUST_OLD)
            or [Retire(reason=PROVEN_UNUSED if _gated_here(settings, obs) else PROVEN_NO_PODS)]
        )
    assert rotation.retire_after is not None
    if now >= rotation.retire_after:
        until = rotation.old_chain_until
        if until is not None and now < until:
            # A forced retire_delay: say what is true, not that nothing old is valid.
            why = (
                "rotation.retire_delay elapsed; certificates issued under the old root stay "
                f"valid until {until:%Y-%m-%dT%H:%M:%SZ} but no verifier trusts them from now"
            )
            return [Retire(reason=why)]
        return [Retire()]
    return [
        Wait("the old root stays trusted until nothing under it is valid", rotation.retire_after)
    ]


PROVEN_UNUSED = (
    "proven unused: everything re-issued and published, every meshed Pod restarted since, "
    "and the bundle without the old root held everywhere"
)
PROVEN_NO_PODS = (
    "proven unused: everything re-issued and published, and the bundle without the old "
    "root confirmed by every publisher (no meshed Pods here to wait for)"
)


class _Lag(NamedTuple):
    """What lagging meshed Pods still do at a stage, and what checking them looks for."""

    doing: str
    checking: str


HOLD_OLD = _Lag("hold an old bundle", "hold the two-root bundle")
STARTED_BEFORE = _Lag(
    "run a proxy started before everything was re-issued", "restarted since the re-issue"
)
TRUST_OLD = _Lag("trust the old root", "hold the bundle without the old root")


def restart_scope(rotation: Rotation, settings: Settings) -> str:
    """What a roll of this rotation restarts: what ``linkerd.restart`` says, or in an
    emergency with ``linkerd.emergency_restart: all`` the data plane too (its proof is
    every proxy restarted; else the operator restarts it, and the gate waits)."""
    linkerd = settings.linkerd
    return "all" if rotation.emergency and linkerd.emergency_restart == "all" else linkerd.restart


def _propagating(state: State, now: datetime, settings: Settings, obs: Observations) -> list[Step]:
    rotation = state.ca.rotation
    assert rotation is not None
    steps = _confirm_and_roll(state, now, settings, obs, "the two-root bundle")
    if steps:
        return steps
    assert rotation.confirmed_at is not None
    ready_at = rotation.confirmed_at + settings.rotation.propagation_delay
    if now < ready_at:
        return [Wait("propagation delay", ready_at)]
    steps = _pods_gate(settings, obs, rotation, HOLD_OLD)
    if steps:
        return steps
    inter_ref = f"kong-{state.ca.serial + 1}" if settings.kong.enabled else None
    return [Activate(intermediate_ref=inter_ref)]


def _prove_unused(state: State, now: datetime, settings: Settings, obs: Observations) -> list[Step]:
    """Retiring on proof, once everything is re-issued: everything published, then the
    data plane rolled and every meshed Pod restarted since (its proxy's certificate now
    comes from the new issuer, which Linkerd already loaded)."""
    rotation = state.ca.rotation
    assert rotation is not None
    issued = [entry.issued for _, entry in state.credentials()]
    published = state.ca.published_at
    if issued and (published is None or published < max(issued)):
        return [Wait("publishing everything re-issued under the new root")]
    what = "the two-root bundle, after everything was re-issued"
    return _confirm_and_roll(state, now, settings, obs, what) or _pods_gate(
        settings, obs, rotation, STARTED_BEFORE
    )


def _confirm_and_roll(
    state: State, now: datetime, settings: Settings, obs: Observations, bundle: str
) -> list[Step]:
    """The step (or the wait) until every publisher confirmed this stage's ``bundle`` and
    Linkerd was rolled after that; none once both are done."""
    rotation = state.ca.rotation
    assert rotation is not None
    expected = bundle_hash(render_pem(trusted_roots(state.ca)))
    if rotation.confirmed_at is None:
        if obs.bundle == expected:
            why = f"every publisher holds {bundle}"
            return [ConfirmBundle(bundle=expected, at=obs.bundle_at, reason=why)]
        return [Wait(f"waiting for every publisher to confirm {bundle}")]
    scope = restart_scope(rotation, settings)
    if settings.linkerd.enabled and scope != "none" and obs.cluster and not rotation.restarted:
        if rotation.restart_at is None:
            # Container start times have whole seconds, and the gate counts a start in the
            # confirmation's second as before it: a Pod rolled in that second would be
            # judged to hold the old bundle for good. Roll from the next second on.
            restart_from = rotation.confirmed_at.replace(microsecond=0) + timedelta(seconds=1)
            if now < restart_from:
                return [
                    Wait("restarting Linkerd from the second after the confirmation", restart_from)
                ]
            return [NoteRestart(scope=scope)]
        return [RestartLinkerd(scope=scope)]
    return []


def _pods_gate(settings: Settings, obs: Observations, rotation: Rotation, lag: _Lag) -> list[Step]:
    """The wait while meshed Pods lag (as ``lag`` says); none once no Pod does."""
    if not (settings.linkerd.enabled and _gated(settings, rotation) and obs.cluster):
        return []
    if obs.pending_pods is None:
        return [Wait(f"checking which meshed pods {lag.checking}", after_publish=True)]
    if obs.pending_pods:
        shown = ", ".join(obs.pending_pods[:5])
        more = f" and {len(obs.pending_pods) - 5} more" if len(obs.pending_pods) > 5 else ""
        return [Wait(f"{len(obs.pending_pods)} meshed pod(s) still {lag.doing}: {shown}{more}")]
    return []


def _gated_here(settings: Settings, obs: Observations) -> bool:
    """Whether meshed Pods were there to wait for (Linkerd, with Kubernetes access)."""
    return settings.linkerd.enabled and obs.cluster


def _gated(settings: Settings, rotation: Rotation) -> bool:
    # Proof is every Pod restarted: only the pods gate can tell, whatever linkerd.gate says.
    gates = [settings.linkerd.gate]
    gates += [settings.linked_linkerd(c).gate for c in rotating_clusters(settings, linkerd=True)]
    return "pods" in gates or rotation.proof


def rotating_clusters(settings: Settings, linkerd: bool = False) -> list[ClusterConfig]:
    """Linked clusters that take part in a root rotation: each holds it until it confirmed
    the bundle; one left out (``in_rotation: false``) is only published to. ``linkerd``:
    only those with Linkerd on (an issuer to move, Pods to wait for)."""
    return [
        c
        for c in settings.linked_clusters
        if c.in_rotation and (not linkerd or settings.linked_linkerd(c).enabled)
    ]


@dataclass(frozen=True)
class GateQuery:
    """Which meshed Pods lag: those not holding the published bundle, which every
    publisher confirmed at ``since``; with ``restarted``, also those whose proxy started
    at or before then."""

    since: datetime
    restarted: bool


def gate_query(state: State, settings: Settings) -> GateQuery | None:
    """What the pods gate asks now (None: nothing): during a stage of a root rotation that
    waits for Pods, once its bundle is confirmed and Linkerd was rolled since."""
    ca = state.ca
    rotation = ca.rotation
    if rotation is None or not settings.linkerd.enabled or not _gated(settings, rotation):
        return None
    stage = ca.phase is Phase.PROPAGATING or (
        rotation.proof and ca.phase in (Phase.ACTIVATED, Phase.RETIRING)
    )
    if not stage or rotation.confirmed_at is None:
        return None
    if restart_scope(rotation, settings) != "none" and not rotation.restarted:
        return None
    return GateQuery(rotation.confirmed_at, restarted=ca.phase is Phase.ACTIVATED)


def _under_old_chain(state: State, settings: Settings) -> int:
    """Credentials (and the Kong intermediate) not yet under the active root."""
    ca = state.ca
    root = ca.active_root
    assert root is not None
    inter = ca.active_intermediate
    count = 0
    if settings.linkerd.enabled:
        home = state.linkerd_issuer
        count += home is None or home.signer_ref != root.ref
        for cluster in rotating_clusters(settings, linkerd=True):
            issuer = state.issuer(cluster.name)
            # One with none yet joined during this rotation: issued once it ended.
            count += issuer is not None and issuer.signer_ref != root.ref
    if settings.kong.enabled:
        if inter is None:
            return count + 1
        configured = {c.name for c in settings.kong_clients_everywhere}
        count += sum(
            1
            for name, entry in state.kong_clients.items()
            if name in configured and entry.signer_ref != inter.ref
        )
        count += len(configured - set(state.kong_clients))
    return count


def _operations(state: State, obs: Observations) -> list[Step]:
    ca = state.ca
    steps: list[Step] = []
    for op in ca.operations:
        if op.target in ROOT_TARGETS:
            in_rotation = ca.rotation is not None and ca.rotation.operation == op.id
            if op.state is OpState.QUEUED and ca.phase is not Phase.STEADY and not in_rotation:
                steps.append(
                    FinishOperation(op.id, False, "a root rotation was already in progress")
                )
            continue  # started by PrepareRoot, finished by Retire
        if op.state is OpState.QUEUED:
            steps.append(StartOperation(op.id))
        elif op.state is OpState.RUNNING and op.revoke and _satisfied(state, op):
            # Revoked only once its replacement is out: revoking first would leave the
            # client presenting a revoked certificate until the next publish.
            if _published_since(state, op):
                steps.append(Revoke(op.id))
        elif op.state is OpState.RUNNING and _satisfied(state, op):
            said = advice(op.target, op.emergency)
            steps.append(
                FinishOperation(op.id, True, f"re-issued; {said}" if said else "re-issued")
            )
    return steps


def _satisfied(state: State, op: Operation) -> bool:
    if op.target == KONG_INTERMEDIATE:
        inter = state.ca.active_intermediate
        return inter is not None and _created(inter) >= op.requested_at
    return all(
        entry.issued >= op.requested_at
        for key, entry in state.credentials()
        if covers(op.target, key)
    )


def _published_since(state: State, op: Operation) -> bool:
    published = state.ca.published_at
    issued = [e.issued for key, e in state.credentials() if covers(op.target, key)]
    return published is not None and all(i <= published for i in issued)


def crl_issuers(record: CaRecord) -> tuple[str, ...]:
    """The CAs whose CRLs are published: every root in the bundle and its Kong
    intermediate (a verifier that checks CRLs wants one for each CA of a chain)."""
    trusted = {fingerprint(c) for c in trusted_roots(record)}
    roots = [r.ref for r in record.roots if fingerprint(r.cert) in trusted]
    inters = [i.ref for i in record.intermediates if i.root_ref in roots]
    return tuple(sorted([*roots, *inters]))


def _crl_refresh(record: CaRecord, now: datetime) -> list[Step]:
    crls = record.crls
    if crls is None:
        return []
    if crls.issuers != crl_issuers(record):
        return [RefreshCrls("the CAs in the bundle changed")]
    if now >= crls.refresh_at:
        return [RefreshCrls(f"halfway to its next update, {crls.next_update:%Y-%m-%dT%H:%M:%SZ}")]
    return []


def _created(inter: IntermediateEntry) -> datetime:
    return inter.created_at or inter.cert.not_valid_before_utc


def retire_after(state: State, now: datetime, settings: Settings) -> datetime:
    """When the old root may leave the bundles: ``rotation.retire_delay`` after activation,
    or (auto) once everything published under the old chain has expired, plus the clock
    skew. Linkerd proxy certificates the old issuer signed (24h) are covered: Linkerd
    clamps them to the issuer's own not-after, which is part of the old chain."""
    rotation = state.ca.rotation
    assert rotation is not None and rotation.activated_at is not None
    delay = settings.rotation.retire_delay
    if delay != "auto":
        assert isinstance(delay, timedelta)
        return rotation.activated_at + delay
    return max(rotation.old_chain_until or now, now) + settings.rotation.clock_skew


def _cn_name(settings: Settings, cluster: str | None = None) -> x509.Name:
    name = settings.issuer_common_name(cluster)
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
