"""The persisted trust state: the CA record, and the issued credentials.

The CA record is small and changes rarely: the roots with their roles, the Kong
intermediate of each root, the root-rotation phase with the times that decide it,
and the queue of manual requests (as SPIRE's CA manager keeps its slots). Issued
credentials (the Linkerd issuer, each Kong client) live apart from it, in the
journal's shard records, so renewing a few writes a few shards, whatever the number
of clients.

Everything published is derived from this state, so a deleted or edited object can
always be rebuilt, and a crash resumes from it.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from cryptography import x509

from ca_daemon.errors import JournalCorrupt
from ca_daemon.pki.bundle import certificate_pem, normalize, parse_pem_certificates

STATE_VERSION = 3
# A CA record that uses what earlier releases of version 3 do not know (an emergency, a
# retirement on proof, revocations, CRLs, linked clusters' answers) is written as version
# 4: such a release then refuses it as newer, instead of writing it back without them.
# Any other stays 3.
CA_FEATURES_VERSION = 4
# Finished manual operations kept for `GET /v1/operations/{id}`; older ones are dropped.
KEEP_FINISHED_OPERATIONS = 50

LINKERD_ISSUER = "linkerd-issuer"
# Seals (e.g. encrypts) or unseals a private key's PEM for the journal.
KeyCodec = Callable[[bytes], bytes]
KONG_PREFIX = "kong/"


ISSUER_PREFIX = "linkerd-issuer/"


def client_key(name: str) -> str:
    """The credential id (and manual target) of one Kong client."""
    return f"{KONG_PREFIX}{name}"


def issuer_key(cluster: str | None) -> str:
    """The credential id of a Linkerd issuer: home's (None), or a linked cluster's."""
    return LINKERD_ISSUER if cluster is None else f"{ISSUER_PREFIX}{cluster}"


def issuer_cluster(key: str) -> str | None:
    """The linked cluster whose issuer ``key`` is (None: home's, or not an issuer)."""
    return key.removeprefix(ISSUER_PREFIX) if key.startswith(ISSUER_PREFIX) else None


def is_credential_key(key: str) -> bool:
    return key == LINKERD_ISSUER or key.startswith((KONG_PREFIX, ISSUER_PREFIX))


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


class OpState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class RootEntry:
    ref: str
    cert: x509.Certificate
    role: RootRole
    created_at: datetime | None = None


@dataclass(frozen=True)
class IntermediateEntry:
    """A Kong intermediate; each root has at most one, the old one lives until retirement."""

    ref: str
    cert: x509.Certificate
    root_ref: str
    created_at: datetime | None = None


@dataclass(frozen=True, eq=False)
class SealedKey:
    """A private key as an encrypting journal holds it, with the SHA-256 of its PEM.

    It is unsealed only where its PEM is used (a file or object that must be written):
    unsealing costs ~0.5 ms a key (PKCS#8's PBKDF2), 2.5 s for 5,000 clients, and a pass
    that finds every published copy current, which it tells by the digest, needs none.
    """

    sealed: bytes = field(repr=False)
    sha256: bytes
    unseal: KeyCodec = field(repr=False)
    credential: str = ""  # whose key, for an error
    # Once needed, kept: a publisher that compares whole objects (Kubernetes Secrets, Kong
    # certificates) needs it at every pass, as when keys were unsealed at load.
    _pem: list[bytes] = field(default_factory=list, repr=False)

    def content(self) -> bytes:
        if not self._pem:
            self._pem.append(self._unsealed())
        return self._pem[0]

    def _unsealed(self) -> bytes:
        fix = (
            "give the passphrase it was sealed with, restore the journal from a backup, or "
            "delete the credential from its shard so that it is issued anew"
        )
        try:
            pem = self.unseal(self.sealed)
        except ValueError as exc:  # the passphrase, or the sealed text (never quoted)
            raise JournalCorrupt(f"the key of {self.credential}: {exc}: {fix}") from None
        if hashlib.sha256(pem).digest() != self.sha256:
            raise JournalCorrupt(
                f"the key of {self.credential} is not the one its digest names: {fix}"
            )
        return pem


@dataclass(frozen=True)
class IssuedEntry:
    """A certificate the daemon issued for a key it generated.

    Two entries are equal when their certificates (which bind the key) and chains are:
    the key is compared by neither, as a sealed one cannot be without unsealing it."""

    cert: x509.Certificate
    key: bytes | SealedKey = field(repr=False, compare=False)
    signer_ref: str
    chain: tuple[x509.Certificate, ...] = ()  # what follows the certificate in tls.crt
    issued_at: datetime | None = None

    @property
    def issued(self) -> datetime:
        return self.issued_at or self.cert.not_valid_before_utc

    @property
    def key_pem(self) -> bytes:
        """The key's PEM (unsealed now when the journal keeps it sealed)."""
        return self.key if isinstance(self.key, bytes) else self.key.content()


@dataclass(frozen=True)
class Operation:
    """A manual rotation request, journaled before it is acknowledged."""

    id: str
    target: str
    reason: str
    requested_at: datetime
    state: OpState = OpState.QUEUED
    result: str | None = None
    finished_at: datetime | None = None
    # Asked for after a key leaked: a root rotation that retires the old root on proof.
    emergency: bool = False
    # A Kong client's key leaked: once re-issued, the certificate it replaced is revoked.
    revoke: bool = False
    # The certificates (PEM) to revoke, noted when the operation started (before any
    # re-issue replaced them in the journal).
    revoking: tuple[str, ...] = ()

    @property
    def open(self) -> bool:
        return self.state in (OpState.QUEUED, OpState.RUNNING)


@dataclass(frozen=True)
class Rotation:
    """The root rotation in progress: the journaled facts each phase is decided on.

    Retiring on ``proof`` rolls the data plane twice more, each time from a bundle every
    publisher confirmed: once everything is re-issued (so every proxy's leaf comes from the
    new issuer), and once the bundle {new} is out (so no proxy trusts the old root). The
    confirmation, restart and pending fields below hold the stage in progress: activation
    and the start of retirement clear them for the next one."""

    started_at: datetime
    trigger: str  # "schedule" | "manual"
    operation: str | None = None
    emergency: bool = False
    # "expiry": the old root stays until nothing under it can be valid; "proof": it leaves
    # once nothing under it is in use (every credential replaced, every proxy restarted).
    retire_on: str = "expiry"
    # Every publisher confirmed the two-root bundle (its hash) at this time.
    confirmed_at: datetime | None = None
    confirmed_bundle: str | None = None
    # Linkerd's workloads are rolled with this restartedAt; restarted once it is done.
    restart_at: datetime | None = None
    restarted: bool = False
    # Meshed Pods last seen on an old bundle (the first few, and how many in all).
    pending_pods: tuple[str, ...] = ()
    pending_count: int = 0
    activated_at: datetime | None = None
    # The latest not-after of anything published under the old chain at activation.
    old_chain_until: datetime | None = None
    retire_after: datetime | None = None

    @property
    def proof(self) -> bool:
        return self.retire_on == "proof"

    def next_stage(self) -> Rotation:
        """This rotation with the confirmation, roll and lagging Pods cleared."""
        return replace(
            self,
            confirmed_at=None,
            confirmed_bundle=None,
            restart_at=None,
            restarted=False,
            pending_pods=(),
            pending_count=0,
        )


@dataclass(frozen=True)
class IssuerAnswer:
    """The issuer with ``serial`` (hex), first written to the cluster at ``published_at``,
    and what Linkerd's identity controller said about it since: loaded it (an
    ``IssuerUpdated`` Event, or an identity Pod that started with it), refused it
    (``IssuerUpdateSkipped``, ``IssuerValidationFailed``), or nothing yet (None)."""

    serial: str
    published_at: datetime
    loaded: bool | None = None
    at: datetime | None = None
    message: str = ""


@dataclass(frozen=True)
class Crls:
    """The CRLs published next to the trust bundle (PEM, one per CA ``issuers`` names),
    once something was revoked: fetched at ``fetched_at`` (the daemon's clock), and made
    anew halfway through their lifetime, or through what was left of it when fetched."""

    pem: str
    issuers: tuple[str, ...]
    this_update: datetime
    next_update: datetime
    fetched_at: datetime

    @property
    def refresh_at(self) -> datetime:
        # Counted on the daemon's clock from when it fetched them (the anchor's may differ),
        # and never later than halfway to the next update: one fetched old is made anew
        # before it expires. Always after the fetch, so a refresh is never due at once.
        lifetime = self.next_update - self.this_update
        left = self.next_update - self.fetched_at
        return self.fetched_at + min(lifetime, left) / 2


@dataclass(frozen=True)
class CaRecord:
    phase: Phase = Phase.STEADY
    phase_since: datetime | None = None
    serial: int = 0  # names CAs (root-1, kong-2, ...) so creating one is idempotent
    roots: tuple[RootEntry, ...] = ()
    intermediates: tuple[IntermediateEntry, ...] = ()
    rotation: Rotation | None = None
    operations: tuple[Operation, ...] = ()
    # Starts anew (the time, in seconds) whenever a lost journal is rebuilt: store versions
    # restart then, and what is published from the rebuilt journal must still count as newer.
    epoch: int = 0
    # The last pass every publisher accepted in full: an object derived from a credential
    # issued (or a phase entered) before then was published, so finding it missing is drift
    # whichever replica published it.
    published_at: datetime | None = None
    # Linkerd's answer about the issuer last published (journaled, so every replica and
    # the rotation's retirement decide on the same fact).
    issuer_answer: IssuerAnswer | None = None
    # The latest end of a credential replaced (or dropped) before it expired by one that
    # ends sooner (its lifetime was shortened): it may still be presented until then, so
    # the next activation counts it in the old chain, and the old root stays that long.
    outlived_until: datetime | None = None
    crls: Crls | None = None
    # The same answer about each linked cluster's own issuer, by cluster name.
    cluster_answers: Mapping[str, IssuerAnswer] = field(default_factory=dict)

    def answer(self, cluster: str | None) -> IssuerAnswer | None:
        """Linkerd's journaled answer about ``cluster``'s issuer (None: home's)."""
        return self.issuer_answer if cluster is None else self.cluster_answers.get(cluster)

    def with_answer(self, cluster: str | None, answer: IssuerAnswer) -> CaRecord:
        if cluster is None:
            return replace(self, issuer_answer=answer)
        return replace(self, cluster_answers={**self.cluster_answers, cluster: answer})

    def root(self, role: RootRole) -> RootEntry | None:
        return next((r for r in self.roots if r.role is role), None)

    @property
    def active_root(self) -> RootEntry | None:
        return self.root(RootRole.ACTIVE)

    def intermediate_of(self, root_ref: str) -> IntermediateEntry | None:
        return next((i for i in self.intermediates if i.root_ref == root_ref), None)

    @property
    def active_intermediate(self) -> IntermediateEntry | None:
        root = self.active_root
        return self.intermediate_of(root.ref) if root else None

    def operation(self, op_id: str) -> Operation | None:
        return next((o for o in self.operations if o.id == op_id), None)

    def with_operation(self, op: Operation) -> CaRecord:
        ops = [o for o in self.operations if o.id != op.id] + [op]
        finished = [o for o in ops if not o.open]
        drop = {o.id for o in finished[:-KEEP_FINISHED_OPERATIONS]}
        return replace(self, operations=tuple(o for o in ops if o.id not in drop))

    def with_intermediate(self, entry: IntermediateEntry) -> CaRecord:
        others = tuple(i for i in self.intermediates if i.root_ref != entry.root_ref)
        return replace(self, intermediates=(*others, entry))


def trusted_roots(record: CaRecord) -> list[x509.Certificate]:
    """Roots every verifier must trust now: a prepared next root is not yet among them,
    and a root retiring on proof was proven unused, so it is left out already."""
    hidden = {RootRole.NEXT} if record.phase in (Phase.STEADY, Phase.PREPARED) else set()
    rotation = record.rotation
    if record.phase is Phase.RETIRING and rotation is not None and rotation.proof:
        hidden = {RootRole.RETIRING}
    return normalize(r.cert for r in record.roots if r.role not in hidden)


@dataclass(frozen=True)
class State:
    """The CA record with every credential: what plan() decides on."""

    ca: CaRecord = field(default_factory=CaRecord)
    linkerd_issuer: IssuedEntry | None = None
    kong_clients: Mapping[str, IssuedEntry] = field(default_factory=dict)
    # Each linked cluster's own Linkerd issuer, by cluster name.
    cluster_issuers: Mapping[str, IssuedEntry] = field(default_factory=dict)

    def credential(self, key: str) -> IssuedEntry | None:
        if key == LINKERD_ISSUER:
            return self.linkerd_issuer
        if key.startswith(ISSUER_PREFIX):
            return self.cluster_issuers.get(key.removeprefix(ISSUER_PREFIX))
        return self.kong_clients.get(key.removeprefix(KONG_PREFIX))

    def issuer(self, cluster: str | None) -> IssuedEntry | None:
        """The Linkerd issuer of ``cluster`` (None: home)."""
        return self.credential(issuer_key(cluster))

    def credentials(self) -> Iterable[tuple[str, IssuedEntry]]:
        if self.linkerd_issuer is not None:
            yield LINKERD_ISSUER, self.linkerd_issuer
        for cluster, entry in self.cluster_issuers.items():
            yield issuer_key(cluster), entry
        for name, entry in self.kong_clients.items():
            yield client_key(name), entry

    @classmethod
    def of(cls, ca: CaRecord, credentials: Iterable[tuple[str, IssuedEntry]]) -> State:
        """The state holding ``credentials`` by key ("linkerd-issuer", "kong/<name>")."""
        return cls(ca=ca).with_credentials(dict(credentials))

    def with_credentials(self, changes: Mapping[str, IssuedEntry | None]) -> State:
        """This state with each keyed credential replaced (None: dropped)."""
        issuer = self.linkerd_issuer
        clients = dict(self.kong_clients)
        issuers = dict(self.cluster_issuers)
        for key, entry in changes.items():
            if key == LINKERD_ISSUER:
                issuer = entry
            elif key.startswith(ISSUER_PREFIX):
                cluster = key.removeprefix(ISSUER_PREFIX)
                if entry is None:
                    issuers.pop(cluster, None)
                else:
                    issuers[cluster] = entry
            elif entry is None:
                clients.pop(key.removeprefix(KONG_PREFIX), None)
            else:
                clients[key.removeprefix(KONG_PREFIX)] = entry
        return replace(self, linkerd_issuer=issuer, kong_clients=clients, cluster_issuers=issuers)


# --- serialization --------------------------------------------------------------------------


def plain(data: bytes) -> bytes:
    """The codec of a journal that keeps keys as they are (Vault KV: Vault protects them)."""
    return data


def _cert(text: str) -> x509.Certificate:
    return parse_pem_certificates(text, what="state certificate")[0]


# Every Kong client's chain is the same intermediate or two: parsed once, shared, not
# 5,000 copies of one certificate.
_chain_cert = functools.lru_cache(maxsize=64)(_cert)


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def credential_to_json(entry: IssuedEntry, seal: KeyCodec = plain) -> dict[str, Any]:
    """A credential record; ``seal`` protects the private key (e.g. encrypts it), and the
    key's SHA-256 goes beside it (a key read sealed is written back as it was)."""
    key = entry.key
    if isinstance(key, SealedKey):
        sealed, digest = key.sealed, key.sha256
    else:
        sealed, digest = seal(key), hashlib.sha256(key).digest()
    return {
        "version": STATE_VERSION,
        "cert": certificate_pem(entry.cert),
        "key": sealed.decode(),
        "key_sha256": digest.hex(),
        "signer_ref": entry.signer_ref,
        "chain": [certificate_pem(c) for c in entry.chain],
        "issued_at": _iso(entry.issued_at),
    }


def credential_from_json(
    data: Mapping[str, Any], unseal: KeyCodec = plain, credential: str = "a credential"
) -> IssuedEntry:
    """The credential in ``data``; its key stays sealed while the record says the key's
    digest (records written before there was one are unsealed here)."""
    stored = data["key"].encode()
    digest = data.get("key_sha256")
    key: bytes | SealedKey
    if unseal is plain:
        key = stored
    elif isinstance(digest, str):
        key = SealedKey(stored, bytes.fromhex(digest), unseal, credential)
    else:
        key = unseal(stored)
    return IssuedEntry(
        cert=_cert(data["cert"]),
        key=key,
        signer_ref=data["signer_ref"],
        chain=tuple(_chain_cert(c) for c in data.get("chain", [])),
        issued_at=_time(data.get("issued_at")),
    )


def _rotation_to_json(rotation: Rotation) -> dict[str, Any]:
    return {
        "started_at": _iso(rotation.started_at),
        "trigger": rotation.trigger,
        "operation": rotation.operation,
        "emergency": rotation.emergency,
        "retire_on": rotation.retire_on,
        "confirmed_at": _iso(rotation.confirmed_at),
        "confirmed_bundle": rotation.confirmed_bundle,
        "restart_at": _iso(rotation.restart_at),
        "restarted": rotation.restarted,
        "pending_pods": list(rotation.pending_pods),
        "pending_count": rotation.pending_count,
        "activated_at": _iso(rotation.activated_at),
        "old_chain_until": _iso(rotation.old_chain_until),
        "retire_after": _iso(rotation.retire_after),
    }


def _rotation_from_json(data: Mapping[str, Any]) -> Rotation:
    started = _time(data["started_at"])
    assert started is not None
    return Rotation(
        started_at=started,
        trigger=data["trigger"],
        operation=data.get("operation"),
        emergency=bool(data.get("emergency")),
        retire_on=data.get("retire_on") or "expiry",
        confirmed_at=_time(data.get("confirmed_at")),
        confirmed_bundle=data.get("confirmed_bundle"),
        restart_at=_time(data.get("restart_at")),
        restarted=bool(data.get("restarted")),
        pending_pods=tuple(data.get("pending_pods") or ()),
        pending_count=int(data.get("pending_count") or 0),
        activated_at=_time(data.get("activated_at")),
        old_chain_until=_time(data.get("old_chain_until")),
        retire_after=_time(data.get("retire_after")),
    )


def _operation_to_json(op: Operation) -> dict[str, Any]:
    return {
        "id": op.id,
        "target": op.target,
        "reason": op.reason,
        "requested_at": _iso(op.requested_at),
        "state": op.state.value,
        "result": op.result,
        "finished_at": _iso(op.finished_at),
        "emergency": op.emergency,
        "revoke": op.revoke,
        "revoking": list(op.revoking),
    }


def _operation_from_json(data: Mapping[str, Any]) -> Operation:
    requested = _time(data["requested_at"])
    assert requested is not None
    return Operation(
        id=data["id"],
        target=data["target"],
        reason=data.get("reason") or "",
        requested_at=requested,
        state=OpState(data["state"]),
        result=data.get("result"),
        finished_at=_time(data.get("finished_at")),
        emergency=bool(data.get("emergency")),
        revoke=bool(data.get("revoke")),
        revoking=tuple(data.get("revoking") or ()),
    )


def _record_version(record: CaRecord) -> int:
    rotation = record.rotation
    newer = (
        record.crls is not None
        or (rotation is not None and (rotation.emergency or rotation.proof))
        or any(o.emergency or o.revoke for o in record.operations)
        or bool(record.cluster_answers)
    )
    return CA_FEATURES_VERSION if newer else STATE_VERSION


def ca_to_json(record: CaRecord) -> dict[str, Any]:
    return {
        "version": _record_version(record),
        "phase": record.phase.value,
        "phase_since": _iso(record.phase_since),
        "serial": record.serial,
        "roots": [
            {
                "ref": r.ref,
                "role": r.role.value,
                "cert": certificate_pem(r.cert),
                "created_at": _iso(r.created_at),
            }
            for r in record.roots
        ],
        "intermediates": [
            {
                "ref": i.ref,
                "root_ref": i.root_ref,
                "cert": certificate_pem(i.cert),
                "created_at": _iso(i.created_at),
            }
            for i in record.intermediates
        ],
        "rotation": _rotation_to_json(record.rotation) if record.rotation else None,
        "operations": [_operation_to_json(o) for o in record.operations],
        "epoch": record.epoch,
        "published_at": _iso(record.published_at),
        "issuer_answer": _answer_to_json(record.issuer_answer),
        "cluster_answers": {c: _answer_to_json(a) for c, a in record.cluster_answers.items()},
        "outlived_until": _iso(record.outlived_until),
        "crls": _crls_to_json(record.crls),
    }


def _crls_to_json(crls: Crls | None) -> dict[str, Any] | None:
    if crls is None:
        return None
    return {
        "pem": crls.pem,
        "issuers": list(crls.issuers),
        "this_update": _iso(crls.this_update),
        "next_update": _iso(crls.next_update),
        "fetched_at": _iso(crls.fetched_at),
    }


def _crls_from_json(data: Mapping[str, Any] | None) -> Crls | None:
    if not data:
        return None
    this_update, next_update = _time(data.get("this_update")), _time(data.get("next_update"))
    fetched_at = _time(data.get("fetched_at"))
    assert this_update is not None and next_update is not None and fetched_at is not None
    issuers = tuple(data.get("issuers") or ())
    return Crls(str(data["pem"]), issuers, this_update, next_update, fetched_at)


def _answer_to_json(answer: IssuerAnswer | None) -> dict[str, Any] | None:
    if answer is None:
        return None
    return {
        "serial": answer.serial,
        "published_at": _iso(answer.published_at),
        "loaded": answer.loaded,
        "at": _iso(answer.at),
        "message": answer.message,
    }


def _answer_from_json(data: Mapping[str, Any] | None) -> IssuerAnswer | None:
    published = _time(data.get("published_at")) if data else None
    if data is None or published is None:
        return None
    loaded = data.get("loaded")
    return IssuerAnswer(
        str(data["serial"]),
        published,
        None if loaded is None else bool(loaded),
        _time(data.get("at")),
        data.get("message") or "",
    )


def ca_from_json(data: Mapping[str, Any]) -> CaRecord:
    if data.get("version") not in (STATE_VERSION, CA_FEATURES_VERSION):
        raise ValueError(f"unsupported state version {data.get('version')!r}")
    rotation = data.get("rotation")
    return CaRecord(
        phase=Phase(data["phase"]),
        phase_since=_time(data.get("phase_since")),
        serial=int(data["serial"]),
        roots=tuple(
            RootEntry(
                ref=r["ref"],
                cert=_cert(r["cert"]),
                role=RootRole(r["role"]),
                created_at=_time(r.get("created_at")),
            )
            for r in data["roots"]
        ),
        intermediates=tuple(
            IntermediateEntry(
                ref=i["ref"],
                root_ref=i["root_ref"],
                cert=_cert(i["cert"]),
                created_at=_time(i.get("created_at")),
            )
            for i in data.get("intermediates", [])
        ),
        rotation=_rotation_from_json(rotation) if rotation else None,
        operations=tuple(_operation_from_json(o) for o in data.get("operations", [])),
        epoch=int(data.get("epoch") or 0),
        published_at=_time(data.get("published_at")),
        issuer_answer=_answer_from_json(data.get("issuer_answer")),
        cluster_answers={
            cluster: answer
            for cluster, raw in (data.get("cluster_answers") or {}).items()
            if (answer := _answer_from_json(raw)) is not None
        },
        outlived_until=_time(data.get("outlived_until")),
        crls=_crls_from_json(data.get("crls")),
    )


def migrate_v1(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split a version-1 state (one document holding every key) into the current CA
    record and one document per credential. Pure: keys stay sealed exactly as they were."""
    if data.get("version") != 1:
        raise ValueError(f"not a version 1 state: {data.get('version')!r}")
    inter = data.get("kong_intermediate")
    ca = {
        "version": STATE_VERSION,
        "phase": data["phase"],
        "phase_since": data.get("phase_since"),
        "serial": data["serial"],
        "roots": [{**r, "created_at": None} for r in data["roots"]],
        "intermediates": [{**inter, "created_at": None}] if inter else [],
        "rotation": None,
        "operations": [],
    }
    credentials: dict[str, dict[str, Any]] = {}
    if data.get("linkerd_issuer"):
        credentials[LINKERD_ISSUER] = {
            **data["linkerd_issuer"],
            "version": STATE_VERSION,
            "issued_at": None,
        }
    for name, entry in (data.get("kong_clients") or {}).items():
        credentials[client_key(name)] = {**entry, "version": STATE_VERSION, "issued_at": None}
    return ca, credentials
