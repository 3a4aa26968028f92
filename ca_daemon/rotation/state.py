"""The persisted trust state: which roots exist and in what role, and what was issued.

This is the journal's content. Everything published is derived from it, so a
deleted or edited object can always be rebuilt, and a crash resumes from it.
Private keys of issued certificates (Linkerd issuer, Kong clients) are part of it:
for the Vault anchor it lives in Vault KV, for the local anchor in a 0600 file with
every key encrypted by the anchor's passphrase.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from cryptography import x509

from ca_daemon.pki.bundle import certificate_pem, parse_pem_certificates

STATE_VERSION = 1


class Phase(enum.StrEnum):
    STEADY = "steady"
    PREPARED = "prepared"
    PROPAGATING = "propagating"
    ACTIVATED = "activated"
    RETIRING = "retiring"


class RootRole(enum.StrEnum):
    ACTIVE = "active"
    NEXT = "next"
    RETIRING = "retiring"


@dataclass(frozen=True)
class RootEntry:
    ref: str
    cert: x509.Certificate
    role: RootRole


@dataclass(frozen=True)
class IntermediateEntry:
    ref: str
    cert: x509.Certificate
    root_ref: str


@dataclass(frozen=True)
class IssuedEntry:
    """A certificate the daemon issued for a key it generated."""

    cert: x509.Certificate
    key_pem: bytes
    signer_ref: str
    chain: tuple[x509.Certificate, ...] = ()  # what follows the certificate in tls.crt


@dataclass(frozen=True)
class State:
    phase: Phase = Phase.STEADY
    phase_since: datetime | None = None
    serial: int = 0  # names CAs (root-1, kong-2, ...) so creating one is idempotent
    roots: tuple[RootEntry, ...] = ()
    kong_intermediate: IntermediateEntry | None = None
    linkerd_issuer: IssuedEntry | None = None
    kong_clients: Mapping[str, IssuedEntry] = field(default_factory=dict)

    def root(self, role: RootRole) -> RootEntry | None:
        return next((r for r in self.roots if r.role is role), None)

    @property
    def active_root(self) -> RootEntry | None:
        return self.root(RootRole.ACTIVE)

    def with_client(self, name: str, entry: IssuedEntry | None) -> State:
        clients = dict(self.kong_clients)
        if entry is None:
            clients.pop(name, None)
        else:
            clients[name] = entry
        return replace(self, kong_clients=clients)


# --- serialization --------------------------------------------------------------------------

KeyCodec = Callable[[bytes], bytes]


def _identity(data: bytes) -> bytes:
    return data


def _pem(cert: x509.Certificate) -> str:
    return certificate_pem(cert)


def _cert(text: str) -> x509.Certificate:
    return parse_pem_certificates(text, what="state certificate")[0]


def _issued_to_json(entry: IssuedEntry, seal: KeyCodec) -> dict[str, Any]:
    return {
        "cert": _pem(entry.cert),
        "key": seal(entry.key_pem).decode(),
        "signer_ref": entry.signer_ref,
        "chain": [_pem(c) for c in entry.chain],
    }


def _issued_from_json(data: Mapping[str, Any], unseal: KeyCodec) -> IssuedEntry:
    return IssuedEntry(
        cert=_cert(data["cert"]),
        key_pem=unseal(data["key"].encode()),
        signer_ref=data["signer_ref"],
        chain=tuple(_cert(c) for c in data.get("chain", [])),
    )


def to_json(state: State, seal: KeyCodec = _identity) -> dict[str, Any]:
    """A JSON-ready dict; ``seal`` protects each private key (e.g. encrypts it)."""
    inter = state.kong_intermediate
    return {
        "version": STATE_VERSION,
        "phase": state.phase.value,
        "phase_since": state.phase_since.isoformat() if state.phase_since else None,
        "serial": state.serial,
        "roots": [{"ref": r.ref, "role": r.role.value, "cert": _pem(r.cert)} for r in state.roots],
        "kong_intermediate": (
            {"ref": inter.ref, "root_ref": inter.root_ref, "cert": _pem(inter.cert)}
            if inter
            else None
        ),
        "linkerd_issuer": (
            _issued_to_json(state.linkerd_issuer, seal) if state.linkerd_issuer else None
        ),
        "kong_clients": {n: _issued_to_json(e, seal) for n, e in state.kong_clients.items()},
    }


def from_json(data: Mapping[str, Any], unseal: KeyCodec = _identity) -> State:
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported state version {data.get('version')!r}")
    inter = data.get("kong_intermediate")
    issuer = data.get("linkerd_issuer")
    since = data.get("phase_since")
    return State(
        phase=Phase(data["phase"]),
        phase_since=datetime.fromisoformat(since) if since else None,
        serial=int(data["serial"]),
        roots=tuple(
            RootEntry(ref=r["ref"], cert=_cert(r["cert"]), role=RootRole(r["role"]))
            for r in data["roots"]
        ),
        kong_intermediate=(
            IntermediateEntry(
                ref=inter["ref"], root_ref=inter["root_ref"], cert=_cert(inter["cert"])
            )
            if inter
            else None
        ),
        linkerd_issuer=_issued_from_json(issuer, unseal) if issuer else None,
        kong_clients={
            n: _issued_from_json(e, unseal) for n, e in data.get("kong_clients", {}).items()
        },
    )
