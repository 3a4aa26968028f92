"""Rebuilding a lost CA record from what the anchor holds and the credentials that survived.

The one way back from a lost journal: it prefers the root the anchor names as default,
then the one that signed surviving credentials, and refuses when it cannot tell.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from ca_daemon.anchor.base import CA
from ca_daemon.config.settings import Settings
from ca_daemon.errors import RebuildRefused
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
from ca_daemon.pki.chain import directly_issued_by

log = logging.getLogger(__name__)

_NAMED = re.compile(r"^(root|kong)-([0-9]+)$")


def _number(ref: str) -> int:
    found = _NAMED.match(ref)
    return int(found.group(2)) if found else 0


def ca_number(ca: CA) -> int:
    """N of a CA the daemon named ``root-N`` or ``kong-N``; 0 for any other."""
    return _number(ca.ref)


def rebuild_ca_record(
    cas: Iterable[CA],
    credentials: Iterable[tuple[str, IssuedEntry]],
    now: datetime,
    keep_old_for: timedelta,
) -> CaRecord:
    """A CA record from the anchor's named CAs (``root-N``, ``kong-N``) and the credential
    records that survived, for a journal whose CA record was lost.

    The active root is the anchor's default issuer (every activation makes the new root
    the default), else the newest still-valid root that signed a surviving credential
    (directly, or through its Kong intermediate), else the only still-valid root. With
    several valid roots and none of that evidence the rebuild is refused: the newest may
    be a prepared root no verifier trusts yet, the oldest one retired long ago, and
    issuing under the wrong one is an outage. Every
    other still-valid root stays trusted as ``retiring`` (phase retiring) until
    ``keep_old_for`` from now or the last surviving credential under it expired,
    whichever is later: nothing published under it drops out of the bundle. Each root
    gets its newest still-valid Kong intermediate. ``serial`` is the highest N, so no
    name is ever made twice. No still-valid root: no roots (a new one is created, under
    a new name). The record starts a new ``epoch`` (``now`` in seconds): the store's
    versions may have restarted, and what is published from here must still be newer.
    """
    named = [ca for ca in cas if _NAMED.match(ca.ref)]
    roots = sorted(
        (ca for ca in named if ca.ref.startswith("root-") and directly_issued_by(ca.cert, ca.cert)),
        key=lambda ca: _number(ca.ref),
    )
    valid_roots = [r for r in roots if r.cert.not_valid_after_utc > now]
    intermediates: dict[str, CA] = {}
    for ca in sorted((c for c in named if c.ref.startswith("kong-")), key=lambda c: _number(c.ref)):
        if ca.cert.not_valid_after_utc <= now:
            continue
        for root in valid_roots:
            if directly_issued_by(ca.cert, root.cert):
                intermediates[root.ref] = ca  # the newest wins
    creds = list(credentials)

    def signed(root: CA) -> list[IssuedEntry]:
        mine = {root.ref} | {i.ref for r, i in intermediates.items() if r == root.ref}
        found = []
        for _, entry in creds:
            parent = entry.chain[0] if entry.chain else root.cert
            if entry.signer_ref in mine and (
                directly_issued_by(entry.cert, root.cert)
                or (entry.chain and directly_issued_by(parent, root.cert))
            ):
                found.append(entry)
        return found

    in_use = [r for r in valid_roots if signed(r)]
    serial = max((_number(ca.ref) for ca in named), default=0)
    epoch = max(1, int(now.timestamp()))
    if not valid_roots:
        return CaRecord(serial=serial, phase_since=now, epoch=epoch)
    defaults = [r for r in valid_roots if r.default]
    if defaults or in_use or len(valid_roots) == 1:
        active = (defaults or in_use or valid_roots)[-1]
    else:
        raise RebuildRefused(
            f"the journal is lost and the anchor holds {len(valid_roots)} valid roots "
            f"({', '.join(r.ref for r in valid_roots)}) with no sign of which was active: "
            "it is not the default issuer and no surviving credential chains to it. "
            "Nothing was changed. Name the root that signs today (the one in every "
            "published bundle since longest): with Vault, make it the default issuer of the "
            "root mount (config/issuers); with the local anchor, write its name into "
            "anchor/default-root. See docs/recovery.md"
        )
    others = [r for r in valid_roots if r.ref != active.ref]
    entries = [
        RootEntry(r.ref, r.cert, RootRole.RETIRING if r in others else RootRole.ACTIVE, now)
        for r in valid_roots
    ]
    inters = tuple(
        IntermediateEntry(i.ref, i.cert, root_ref, now) for root_ref, i in intermediates.items()
    )
    if not others:
        return CaRecord(
            phase=Phase.STEADY,
            phase_since=now,
            serial=serial,
            roots=tuple(entries),
            intermediates=inters,
            epoch=epoch,
        )
    until = max(
        [now + keep_old_for, *(e.cert.not_valid_after_utc for r in others for e in signed(r))]
    )
    rotation = Rotation(
        started_at=now,
        trigger="rebuild",
        activated_at=now,
        old_chain_until=until,
        retire_after=until,
    )
    return CaRecord(
        phase=Phase.RETIRING,
        phase_since=now,
        serial=serial,
        roots=tuple(entries),
        intermediates=inters,
        rotation=rotation,
        epoch=epoch,
    )


def rebuild(
    cas: Iterable[CA],
    reason: str,
    state: State,
    now: datetime,
    settings: Settings,
    anchor: str,
) -> CaRecord:
    """The rebuilt CA record for a pass, kept as long as anything issued under an old
    root may live (the longest credential lifetime, Linkerd's 24 h proxy certificates
    and the clock skew, as ``rotation.retire_delay``); said loudly in the log."""
    s = settings
    lifetimes = s.credential_lifetimes()
    keep = max(lifetimes, default=timedelta(0)) + timedelta(hours=24) + s.rotation.clock_skew
    if isinstance(s.rotation.retire_delay, timedelta):
        keep = max(keep, s.rotation.retire_delay)
    # Requests accepted while the record was missing (any replica may journal one) are
    # all it holds: they stay, to be carried out or refused on the rebuilt record.
    record = replace(
        rebuild_ca_record(cas, state.credentials(), now, keep), operations=state.ca.operations
    )
    roles = ", ".join(f"{r.ref} ({r.role.value})" for r in record.roots) or "none valid"
    inters = ", ".join(f"{i.ref} under {i.root_ref}" for i in record.intermediates) or "none"
    log.warning(
        "JOURNAL REBUILT from %s: %s. Roots: %s; Kong intermediates: %s; %d surviving "
        "credential record(s); next CA serial after %d; phase %s",
        anchor,
        reason,
        roles,
        inters,
        len(list(state.credentials())),
        record.serial,
        record.phase.value,
    )
    return record
