"""Checks of the journal against itself and the anchor, before anything is signed or
published from it. Pure: the anchor's CAs come in as a value."""

from __future__ import annotations

from ca_daemon.anchor.base import CA
from ca_daemon.model.state import RootRole, State

UNTRUSTED = (
    "Nothing was signed or published. Restore the journal's CA record from a backup, or "
    "move it aside so the next pass rebuilds it from the anchor's named CAs (docs/recovery.md)"
)


def journal_problems(state: State, anchor_cas: tuple[CA, ...] | None = None) -> list[str]:
    """Why the journal cannot be trusted as it is: it contradicts itself, or (when the
    anchor's CAs are given) what the anchor holds. Answering such a journal with a fresh
    root would drop the roots every verifier trusts: an outage."""
    ca = state.ca
    problems = []
    active = [r for r in ca.roots if r.role is RootRole.ACTIVE]
    if ca.roots and not active:
        roles = ", ".join(f"{r.ref} ({r.role.value})" for r in ca.roots)
        problems.append(f"the CA record holds roots ({roles}) but none is active")
    if len(active) > 1:
        problems.append(f"the CA record has {len(active)} active roots")
    if not ca.roots and ca.serial > 0:
        problems.append(
            f"the CA record names no root, yet it has made CAs up to number {ca.serial}"
        )
    if not ca.roots and ca.intermediates:
        problems.append("the CA record names no root, yet holds Kong intermediates")
    if anchor_cas is not None and ca.roots:
        held = {c.ref: c.cert for c in anchor_cas}
        for ref, cert in [
            *((r.ref, r.cert) for r in ca.roots),
            *((i.ref, i.cert) for i in ca.intermediates),
        ]:
            if ref not in held:
                problems.append(f"{ref} is in the journal but the anchor holds no such CA")
            elif held[ref] != cert:
                problems.append(
                    f"the journal's {ref} is not the certificate the anchor holds under that name"
                )
    return problems
