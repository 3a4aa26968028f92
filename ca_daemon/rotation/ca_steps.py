"""One CA step at a time: (step, state, now, anchor, settings) → the new CA record.

Each function does the step's work against the anchor (create a root, an intermediate,
make one the default) or, for Linkerd's restart, against the cluster, and returns the
record to journal. None of them writes the journal: the engine saves what they return,
once per step, before anything derived from it is published.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime

from cryptography import x509

from ca_daemon.anchor.base import CA, Anchor, revoker
from ca_daemon.config.settings import Settings
from ca_daemon.errors import RotationError
from ca_daemon.model.state import (
    CaRecord,
    Crls,
    IntermediateEntry,
    OpState,
    Phase,
    RootEntry,
    RootRole,
    Rotation,
    State,
)
from ca_daemon.pki.bundle import parse_pem_certificates
from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.pki.crl import crls_pem
from ca_daemon.pki.profiles import Kind, Subject, capped_validity, check_profile
from ca_daemon.publish.base import Rollout
from ca_daemon.rotation.plan import crl_issuers, retire_after
from ca_daemon.rotation.rebuild import rebuild
from ca_daemon.rotation.steps import (
    Activate,
    AdvanceSerial,
    CaStep,
    ConfirmBundle,
    CreateRoot,
    FinishOperation,
    IssueKongIntermediate,
    NoteRestart,
    PrepareRoot,
    Propagate,
    RebuildJournal,
    RefreshCrls,
    RestartLinkerd,
    Retire,
    Revoke,
    StartOperation,
    StartRetiring,
)

log = logging.getLogger(__name__)


class IssuanceError(RotationError):
    """The anchor answered with a certificate the daemon will not publish."""


def require(
    kind: Kind, cert: x509.Certificate, signer: x509.Certificate | None, anchor: Anchor
) -> None:
    """Refuse a certificate from the anchor that breaks its profile, outlives its signer,
    or does not verify under it. (The forecast's anchor, which only simulates dates, says
    ``stand_in_signatures``: its signatures are not meant to verify.)"""
    problems = list(check_profile(kind, cert).problems)
    if signer is not None and cert.not_valid_after_utc > signer.not_valid_after_utc:
        problems.append("outlives its signer")
    real = not getattr(anchor, "stand_in_signatures", False)
    if signer is not None and real and not directly_issued_by(cert, signer):
        # The anchor signed with a key that is not the journal's CA's: nothing could chain.
        problems.append("not signed by the journal's CA certificate (its name or key differ)")
    if problems:
        raise IssuanceError(f"{kind.value} from the anchor is unusable: {'; '.join(problems)}")


def _serial(ref: str) -> int:
    return int(ref.rsplit("-", 1)[1])


def apply(
    step: CaStep,
    state: State,
    now: datetime,
    anchor: Anchor,
    settings: Settings,
    rollout: Rollout | None = None,
) -> CaRecord:
    """Carry out ``step`` and return the CA record to journal."""
    s = settings
    ca = state.ca
    match step:
        case RebuildJournal(cas=cas, reason=reason):
            return rebuild(cas, reason, state, now, s, anchor.description)
        case AdvanceSerial(to=number):
            return replace(ca, serial=max(ca.serial, number))
        case CreateRoot(ref=ref):
            made = _root(ref, now, anchor, s)
            # Noted in the anchor too: a journal rebuilt after a loss finds it there.
            anchor.set_default(CA(made.ref, made.cert), None)
            entry = RootEntry(made.ref, made.cert, RootRole.ACTIVE, now)
            return replace(
                ca, roots=(*ca.roots, entry), serial=_serial(ref), phase_since=ca.phase_since or now
            )
        case PrepareRoot(ref=ref, operation=operation):
            made = _root(ref, now, anchor, s)
            op = ca.operation(operation) if operation else None
            emergency = op is not None and op.emergency
            record = replace(
                ca,
                roots=(*ca.roots, RootEntry(made.ref, made.cert, RootRole.NEXT, now)),
                serial=max(ca.serial, _serial(ref)),
                phase=Phase.PREPARED,
                phase_since=now,
                rotation=Rotation(
                    started_at=now,
                    trigger="manual" if operation else "schedule",
                    operation=operation,
                    emergency=emergency,
                    retire_on="proof" if emergency else s.rotation.retire,
                ),
            )
            if op is not None:
                record = record.with_operation(replace(op, state=OpState.RUNNING))
            return record
        case Propagate():
            return replace(ca, phase=Phase.PROPAGATING, phase_since=now)
        case ConfirmBundle(bundle=bundle, at=at):
            assert ca.rotation is not None
            confirmed = max(now, at) if at is not None else now
            rotation = replace(ca.rotation, confirmed_at=confirmed, confirmed_bundle=bundle)
            return replace(ca, rotation=rotation)
        case NoteRestart():
            # Journaled before the roll: a retry after a crash patches the same
            # restartedAt again, which Kubernetes treats as no change.
            assert ca.rotation is not None
            return replace(ca, rotation=replace(ca.rotation, restart_at=now))
        case RestartLinkerd(scope=scope):
            return _restart(ca, scope, rollout)
        case Activate(intermediate_ref=inter_ref):
            return _activate(state, now, inter_ref, anchor, s)
        case StartRetiring():
            assert ca.rotation is not None
            if ca.rotation.proof:  # the old root leaves the bundle now, proven unused
                rotation = replace(ca.rotation.next_stage(), retire_after=now)
            else:
                rotation = replace(ca.rotation, retire_after=retire_after(state, now, s))
            return replace(ca, phase=Phase.RETIRING, phase_since=now, rotation=rotation)
        case Retire():
            return _retire(ca, now)
        case IssueKongIntermediate(ref=ref):
            active = ca.active_root
            if active is None:
                raise IssuanceError("no active trust anchor")
            inter = _intermediate(ref, active, now, anchor, s)
            return replace(ca.with_intermediate(inter), serial=max(ca.serial, _serial(ref)))
        case StartOperation(operation=op_id):
            op = ca.operation(op_id)
            assert op is not None
            return ca.with_operation(replace(op, state=OpState.RUNNING))
        case Revoke(operation=op_id):
            return _revoke(ca, op_id, now, anchor)
        case RefreshCrls():
            return replace(ca, crls=_crls(ca, now, anchor, rebuild=True))
        case FinishOperation(operation=op_id, ok=ok, reason=reason):
            op = ca.operation(op_id)
            assert op is not None
            done = OpState.SUCCEEDED if ok else OpState.FAILED
            return ca.with_operation(replace(op, state=done, result=reason, finished_at=now))


def _revoke(ca: CaRecord, op_id: str, now: datetime, anchor: Anchor) -> CaRecord:
    """Revoke what the operation's re-issue replaced, fetch the CRLs, finish it."""
    op = ca.operation(op_id)
    assert op is not None
    backend = revoker(anchor)
    if backend is None:
        raise IssuanceError(f"{anchor.description} cannot revoke certificates")
    serials, unlisted = [], []
    for pem in op.revoking:
        cert = parse_pem_certificates(pem, what="certificate to revoke")[0]
        if cert.not_valid_after_utc <= now:
            continue  # expired: no verifier accepts it any more
        issuer = next((i for i in ca.intermediates if directly_issued_by(cert, i.cert)), None)
        if issuer is None:
            # Its Kong intermediate was replaced since: still valid under its root, and no
            # CRL of it is published. Only retiring that root ends the trust.
            unlisted.append(f"{cert.serial_number:x}")
            continue
        backend.revoke(cert, CA(issuer.ref, issuer.cert))
        serials.append(f"{cert.serial_number:x}")
    # Made anew, both mounts: the root mount's CRL may have aged since it was last built.
    record = replace(ca, crls=_crls(ca, now, anchor, rebuild=True))
    if unlisted:
        why = (
            f"re-issued, but serial {', '.join(unlisted)} was signed by a Kong intermediate "
            "replaced since, whose CRL is not published: it stays trusted until its root "
            "retires (ca-daemon rotate trust-anchor --emergency)"
        )
        failed = replace(op, state=OpState.FAILED, result=why, finished_at=now)
        return record.with_operation(failed)
    said = ", ".join(serials) or "none (it had expired)"
    done = replace(op, state=OpState.SUCCEEDED, result=f"re-issued; revoked serial {said}")
    return record.with_operation(replace(done, finished_at=now))


def _crls(ca: CaRecord, now: datetime, anchor: Anchor, rebuild: bool) -> Crls:
    """The CRLs of every CA in the bundle, checked before they are published: each
    signed by its CA and naming it, and current."""
    backend = revoker(anchor)
    if backend is None:
        raise IssuanceError(f"{anchor.description} cannot make CRLs")
    refs = crl_issuers(ca)
    known = {r.ref: r.cert for r in ca.roots} | {i.ref: i.cert for i in ca.intermediates}
    cas = [CA(ref, known[ref]) for ref in refs]
    found = backend.crls(cas, now, rebuild)
    real = not getattr(anchor, "stand_in_signatures", False)  # as require() says
    for ca_entry, crl in zip(cas, found, strict=True):
        if crl.issuer != ca_entry.cert.subject or (
            real
            and not crl.is_signature_valid(
                ca_entry.cert.public_key()  # type: ignore[arg-type]
            )
        ):
            raise IssuanceError(f"the CRL of {ca_entry.ref} from the anchor is not signed by it")
        if crl.next_update_utc is None or crl.next_update_utc <= now:
            raise IssuanceError(f"the CRL of {ca_entry.ref} from the anchor is out of date")
    return Crls(
        pem=crls_pem(found),
        issuers=refs,
        this_update=max(c.last_update_utc for c in found),
        next_update=min(c.next_update_utc for c in found if c.next_update_utc is not None),
        fetched_at=now,
    )


def _root(ref: str, now: datetime, anchor: Anchor, s: Settings) -> CA:
    validity = capped_validity(now, s.root.lifetime, None, s.rotation.clock_skew)
    made = anchor.create_root(ref, Subject(s.root_common_name), s.root.key, validity)
    require(Kind.TRUST_ANCHOR, made.cert, None, anchor)
    return made


def _intermediate(
    ref: str, root: RootEntry, now: datetime, anchor: Anchor, s: Settings
) -> IntermediateEntry:
    validity = capped_validity(
        now, s.kong.intermediate.lifetime, root.cert.not_valid_after_utc, s.rotation.clock_skew
    )
    subject = Subject(s.kong_intermediate_common_name)
    made = anchor.create_intermediate(ref, CA(root.ref, root.cert), subject, validity)
    require(Kind.KONG_INTERMEDIATE, made.cert, root.cert, anchor)
    return IntermediateEntry(ref=made.ref, cert=made.cert, root_ref=root.ref, created_at=now)


def _restart(ca: CaRecord, scope: str, rollout: Rollout | None) -> CaRecord:
    """Roll Linkerd with the journaled restartedAt (NoteRestart came first)."""
    rotation = ca.rotation
    assert rotation is not None and rotation.restart_at is not None
    if rollout is None:
        raise IssuanceError("no Kubernetes access to restart Linkerd's workloads")
    rolled = rollout.restart("all" if scope == "all" else "control-plane", rotation.restart_at)
    log.info("rolled %d Linkerd workload(s): %s", len(rolled), ", ".join(rolled) or "none")
    return replace(ca, rotation=replace(rotation, restarted=True))


def _activate(
    state: State, now: datetime, inter_ref: str | None, anchor: Anchor, s: Settings
) -> CaRecord:
    ca = state.ca
    old, nxt = ca.active_root, ca.root(RootRole.NEXT)
    assert old is not None and nxt is not None and ca.rotation is not None
    record = ca
    inter: IntermediateEntry | None = None
    if inter_ref is not None:
        inter = _intermediate(inter_ref, nxt, now, anchor, s)
        record = replace(record.with_intermediate(inter), serial=max(ca.serial, _serial(inter_ref)))
    anchor.set_default(CA(nxt.ref, nxt.cert), CA(inter.ref, inter.cert) if inter else None)
    published_until = max(
        (entry.cert.not_valid_after_utc for _, entry in state.credentials()), default=now
    )
    if ca.outlived_until is not None:
        published_until = max(published_until, ca.outlived_until)
    roles = {old.ref: RootRole.RETIRING, nxt.ref: RootRole.ACTIVE}
    # Retiring on proof, the two-root bundle is confirmed and rolled out once more when
    # everything is re-issued: that stage starts afresh.
    rotation = ca.rotation.next_stage() if ca.rotation.proof else ca.rotation
    return replace(
        record,
        roots=tuple(replace(r, role=roles.get(r.ref, r.role)) for r in record.roots),
        phase=Phase.ACTIVATED,
        phase_since=now,
        rotation=replace(rotation, activated_at=now, old_chain_until=published_until),
    )


def _retire(ca: CaRecord, now: datetime) -> CaRecord:
    """The old root leaves the journal (and so every bundle); it stays in the anchor."""
    active = ca.active_root
    assert active is not None and ca.rotation is not None
    record = replace(
        ca,
        roots=(active,),
        intermediates=tuple(i for i in ca.intermediates if i.root_ref == active.ref),
        phase=Phase.STEADY,
        phase_since=now,
        rotation=None,
    )
    op = ca.operation(ca.rotation.operation) if ca.rotation.operation else None
    if op is not None:
        record = record.with_operation(
            replace(op, state=OpState.SUCCEEDED, result=f"rotated to {active.ref}", finished_at=now)
        )
    return record
