"""The forecast's surroundings, simulated in memory: a journal of objects with
check-and-set versions, an anchor that signs with throwaway keys, a publisher that always
confirms, and a rollout whose Pods are always current (report/forecast.py says why)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca_daemon.anchor.base import CA, Anchor
from ca_daemon.config.settings import KongClient, Settings
from ca_daemon.errors import AnchorError, JournalConflict
from ca_daemon.journal.journal import Journal, Versioned
from ca_daemon.journal.store.records import Record
from ca_daemon.model.state import (
    CaRecord,
    IssuedEntry,
    State,
)
from ca_daemon.model.world import TrustWorld
from ca_daemon.pki.bundle import fingerprint
from ca_daemon.pki.crl import sign_crl
from ca_daemon.pki.keys import KeyType, PrivateKey, PublicKey, generate_key, private_key_pem
from ca_daemon.pki.profiles import Kind, Subject, Validity, sign_certificate
from ca_daemon.publish.base import PublishReport
from ca_daemon.publish.linkerd_identity import Answer
from ca_daemon.rotation.renewals import order
from ca_daemon.rotation.steps import IssueKongClient, IssueLinkerdIssuer


class _NoStore:
    """The RecordStore a MemoryJournal never uses (it keeps objects, not records)."""

    description = "forecast (in memory)"

    def read(self, key: str) -> tuple[Record, int] | None:
        raise AssertionError("MemoryJournal keeps its state as objects")

    def write(self, key: str, record: Record, version: int) -> int:
        raise AssertionError("MemoryJournal keeps its state as objects")

    def delete(self, key: str) -> None:
        raise AssertionError("MemoryJournal keeps its state as objects")

    def list(self, folder: str) -> list[str]:
        raise AssertionError("MemoryJournal keeps its state as objects")


class MemoryJournal(Journal):
    """The journal's contract (per-record versions, check-and-set) over objects in memory.

    ``view`` narrows what a pass loads to some credentials (None: all of them); saving
    reaches the whole state either way.
    """

    def __init__(self, state: State) -> None:
        super().__init__(_NoStore())
        self._ca = state.ca
        self._ca_version = 1 if state.ca != CaRecord() else 0
        self._credentials: dict[str, tuple[IssuedEntry, int]] = {
            key: (entry, 1) for key, entry in state.credentials()
        }
        self.view: frozenset[str] | None = None

    @property
    def ca(self) -> CaRecord:
        return self._ca

    def entry(self, key: str) -> IssuedEntry | None:
        found = self._credentials.get(key)
        return found[0] if found else None

    @property
    def state(self) -> State:
        """The whole state, whatever the view."""
        return self._state(self._credentials.items())

    def _state(self, items: Iterable[tuple[str, tuple[IssuedEntry, int]]]) -> State:
        return State.of(self._ca, ((key, entry) for key, (entry, _) in items))

    def load_ca(self, migrate: bool = True) -> tuple[CaRecord, int]:
        return self._ca, self._ca_version

    def load(self, migrate: bool = True) -> Versioned:
        if self.view is None:
            items = list(self._credentials.items())
        else:
            items = [(k, self._credentials[k]) for k in self.view if k in self._credentials]
        versions = {key: version for key, (_, version) in items}
        return Versioned(self._state(items), self._ca_version, versions)

    def save_ca(self, record: CaRecord, version: int) -> int:
        if version != self._ca_version:
            raise JournalConflict(f"CA record: version {self._ca_version}, expected {version}")
        self._ca, self._ca_version = record, version + 1
        return self._ca_version

    def save_credentials(
        self, shard: str, version: int, changes: Mapping[str, IssuedEntry | None]
    ) -> tuple[int, dict[str, int]]:
        # A forecast has one writer: shards need no check-and-set here.
        revisions: dict[str, int] = {}
        for key, entry in changes.items():
            current = self._credentials.get(key)
            if entry is None:
                self._credentials.pop(key, None)
                revisions[key] = 0
            else:
                revisions[key] = (current[1] if current else 0) + 1
                self._credentials[key] = (entry, revisions[key])
        return version + 1, revisions


# --- the simulated anchor, publisher and rollout -----------------------------------------


class SimulatedAnchor:
    """Signs in memory with throwaway keys; a CA from the journal gets a stand-in key.

    Signatures do not verify against the real CAs: only the dates matter. Each
    certificate it makes remembers whether its not-after is known exactly (it was
    issued at an exact time, or capped at a signer whose not-after is exact).
    """

    description = "forecast anchor (in memory)"
    stand_in_signatures = True  # the engine does not verify what this signs

    def __init__(self) -> None:
        self._keys: dict[str, PrivateKey] = {}
        self._end_exact: dict[str, bool] = {}  # by fingerprint; absent: from the journal
        self.pass_exact = True  # set by the forecast before each pass

    def end_exact(self, cert: x509.Certificate) -> bool:
        return self._end_exact.get(fingerprint(cert), True)

    def simulated(self, cert: x509.Certificate) -> bool:
        return fingerprint(cert) in self._end_exact

    def _key(self, ref: str) -> PrivateKey:
        key = self._keys.get(ref)
        if key is None:
            key = self._keys[ref] = generate_key("ec-p256")
        return key

    def _made(
        self, cert: x509.Certificate, signer: x509.Certificate | None, validity: Validity
    ) -> x509.Certificate:
        capped = signer is not None and validity.not_after == signer.not_valid_after_utc
        exact = self.end_exact(signer) if capped and signer is not None else self.pass_exact
        self._end_exact[fingerprint(cert)] = exact
        return cert

    def check(self) -> None:
        pass

    def revoke(self, cert: x509.Certificate, issuer: CA) -> None:
        pass  # only the CRLs' dates matter here

    def crls(
        self, cas: Sequence[CA], now: datetime, rebuild: bool
    ) -> list[x509.CertificateRevocationList]:
        return [sign_crl(ca.cert, self._key(ca.ref), (), now) for ca in cas]

    def create_root(self, ref: str, subject: Subject, key_type: KeyType, validity: Validity) -> CA:
        key = self._keys[ref] = generate_key(key_type)
        cert = sign_certificate(Kind.TRUST_ANCHOR, subject, key.public_key(), key, None, validity)
        return CA(ref, self._made(cert, None, validity))

    def create_intermediate(self, ref: str, root: CA, subject: Subject, validity: Validity) -> CA:
        public = self._key(ref).public_key()
        cert = self._sign(Kind.KONG_INTERMEDIATE, subject, public, root, validity)
        return CA(ref, cert)

    def sign_ca(
        self, root: CA, csr: x509.CertificateSigningRequest, subject: Subject, validity: Validity
    ) -> x509.Certificate:
        return self._sign(Kind.LINKERD_ISSUER, subject, _public(csr), root, validity)

    def sign_client(
        self,
        intermediate: CA,
        csr: x509.CertificateSigningRequest,
        subject: Subject,
        validity: Validity,
    ) -> x509.Certificate:
        return self._sign(Kind.KONG_CLIENT, subject, _public(csr), intermediate, validity)

    def _sign(
        self, kind: Kind, subject: Subject, public: PublicKey, signer: CA, validity: Validity
    ) -> x509.Certificate:
        cert = sign_certificate(kind, subject, public, self._key(signer.ref), signer.cert, validity)
        return self._made(cert, signer.cert, validity)

    def set_default(self, root: CA, intermediate: CA | None) -> None:
        pass

    def sign_public(
        self, kind: Kind, subject: Subject, public: PublicKey, signer: CA, validity: Validity
    ) -> x509.Certificate:
        """A certificate for ``public`` without a CSR (see :func:`simulated_issue`)."""
        return self._sign(kind, subject, public, signer, validity)


@functools.cache
def _credential_key() -> tuple[PublicKey, bytes]:
    """One throwaway key for every credential the forecast issues, made on first use."""
    key = generate_key("ec-p256")
    return key.public_key(), private_key_pem(key)


def simulated_issue(
    step: IssueLinkerdIssuer | IssueKongClient,
    state: State,
    now: datetime,
    anchor: Anchor,
    settings: Settings,
    clients: Mapping[str, KongClient],
) -> IssuedEntry:
    """``renewals.issue`` without what matters only for a real credential: a key of its
    own, a CSR, the profile checked. The order (signer, subject, validity) is the real
    one, so every date is; a year at 5,000 clients signs ~100,000 certificates."""
    public, pem = _credential_key()
    assert isinstance(anchor, SimulatedAnchor), "the forecast's own anchor"
    wanted = order(step, state, now, settings, clients)
    cert = anchor.sign_public(wanted.kind, wanted.subject, public, wanted.signer, wanted.validity)
    return IssuedEntry(cert, pem, wanted.signer.ref, wanted.chain, now)


def _public(csr: x509.CertificateSigningRequest) -> PublicKey:
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise AnchorError(f"unsupported CSR key type {type(key).__name__}")
    return key


class ConfirmingPublisher:
    """Publishes nowhere; confirms every bundle at once (the earliest propagation start)."""

    description = "forecast publisher (in memory, confirms at once)"

    def publish(self, world: TrustWorld) -> PublishReport:
        return PublishReport(self.description)


class CurrentRollout:
    """Restarts Linkerd at once, sees every meshed Pod on the current bundle, and has
    Linkerd's identity controller load each issuer the moment it is made."""

    description = "forecast rollout (every Pod current)"

    def restart(self, scope: Literal["control-plane", "all"], at: datetime) -> list[str]:
        return []

    def would_touch(self, scope: Literal["control-plane", "all"]) -> tuple[list[str], list[str]]:
        return [], []

    def pending_pods(
        self, bundle_pem: str, confirmed_at: datetime, restarted: bool = False
    ) -> list[str]:
        return []

    def report_pending(self, pods: list[str], bundle_hash: str) -> None:
        pass

    def issuer_answer(self, since: datetime) -> Answer | None:
        return Answer(True, since, "forecast: loaded at once")

    def report_issuer(self, problem: str | None) -> None:
        pass


# --- moving the clock ------------------------------------------------------------------
