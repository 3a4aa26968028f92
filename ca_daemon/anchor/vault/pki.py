"""Vault / OpenBao anchor: roots and the Kong intermediate live in PKI mounts.

Root keys are generated inside Vault (``root/rotate/internal``) and never exported;
each root is a named issuer on ``root_mount``, so several can coexist during a root
rotation. The Kong intermediate is an issuer on ``kong_mount`` whose key Vault made
(``intermediate/generate/internal`` → ``sign-intermediate`` by the root →
``intermediate/set-signed``); Kong client CSRs are signed there by the role
``kong-client``. Every lifetime is given as an explicit ``not_after`` the daemon
has already capped at the signer's own not-after.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_daemon.anchor.base import CA
from ca_daemon.anchor.vault.client import VaultClient, VaultNotFound
from ca_daemon.errors import AnchorError
from ca_daemon.pki.bundle import parse_pem_certificates
from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.pki.keys import KeyType
from ca_daemon.pki.profiles import Subject, Validity

log = logging.getLogger(__name__)

KONG_CLIENT_ROLE = "kong-client"
# Mount ceiling; the daemon's own caps are what really bound each certificate.
MOUNT_MAX_TTL = "876000h"

_KEY_PARAMS: dict[str, dict[str, Any]] = {
    "ec-p256": {"key_type": "ec", "key_bits": 256},
    "rsa-2048": {"key_type": "rsa", "key_bits": 2048, "signature_bits": 256},
    "rsa-4096": {"key_type": "rsa", "key_bits": 4096, "signature_bits": 256},
}


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _csr_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


class VaultPkiAnchor:
    """The Anchor protocol on Vault/OpenBao PKI mounts."""

    def __init__(self, client: VaultClient) -> None:
        self.client = client
        self.cfg = client.cfg
        self.description = f"Vault at {self.cfg.address}"
        self._set_up = False

    # --- setup and health ---------------------------------------------------------------

    def check(self) -> None:
        self.client.request("GET", "auth/token/lookup-self", "token lookup")
        if not self._set_up:
            self._ensure_setup()
            self._set_up = True

    def _ensure_setup(self) -> None:
        if not self.cfg.create_if_missing:
            return
        mounts = self.client.request("GET", "sys/mounts", "list secret engines") or {}
        mounts = mounts.get("data", mounts)
        for mount in (self.cfg.root_mount, self.cfg.kong_mount):
            if f"{mount}/" not in mounts:
                self.client.request(
                    "POST",
                    f"sys/mounts/{mount}",
                    f"enable PKI at {mount}",
                    {"type": "pki", "config": {"max_lease_ttl": MOUNT_MAX_TTL}},
                )
        if f"{self.cfg.kv_mount}/" not in mounts:
            self.client.request(
                "POST",
                f"sys/mounts/{self.cfg.kv_mount}",
                f"enable KV v2 at {self.cfg.kv_mount}",
                {"type": "kv", "options": {"version": "2"}},
            )
        self.client.write(
            f"{self.cfg.kong_mount}/roles/{KONG_CLIENT_ROLE}",
            "write the Kong client role",
            {
                "allow_any_name": True,
                "enforce_hostnames": False,
                "allow_ip_sans": False,
                "allowed_uri_sans": ["*"],
                "server_flag": False,
                "client_flag": True,
                "code_signing_flag": False,
                "email_protection_flag": False,
                "key_type": "any",
                "key_usage": ["DigitalSignature"],
                "basic_constraints_valid_for_non_ca": True,
                "use_csr_common_name": False,
                "use_csr_sans": False,
                "no_store": True,
                "generate_lease": False,
                "max_ttl": MOUNT_MAX_TTL,
            },
        )

    # --- CAs -----------------------------------------------------------------------------

    def _existing(self, mount: str, ref: str) -> CA | None:
        data = self.client.read(f"{mount}/issuer/{ref}", f"read issuer {ref} on {mount}")
        if not data or not data.get("certificate"):
            return None
        return CA(ref, parse_pem_certificates(data["certificate"], what=f"issuer {ref}")[0])

    def existing_cas(self) -> list[CA]:
        """The named issuers on both PKI mounts (LIST ``<mount>/issuers``, then each read)."""
        found = []
        for mount in (self.cfg.root_mount, self.cfg.kong_mount):
            try:
                listed = self.client.request("LIST", f"{mount}/issuers", f"list issuers on {mount}")
            except VaultNotFound:  # no issuer at all yet
                continue
            default = self._default_issuer(mount) if mount == self.cfg.root_mount else None
            info = ((listed or {}).get("data") or {}).get("key_info") or {}
            for issuer_id, meta in sorted(info.items()):
                name = (meta or {}).get("issuer_name") or ""
                if not name:
                    continue  # not one the daemon named
                ca = self._existing(mount, issuer_id)
                if ca is not None:
                    found.append(CA(name, ca.cert, default=issuer_id == default))
        return found

    def _default_issuer(self, mount: str) -> str | None:
        """The id of ``mount``'s default issuer; None when Vault will not say."""
        try:
            data = self.client.read(
                f"{mount}/config/issuers", f"read the default issuer of {mount}"
            )
        except AnchorError as exc:  # a policy from before this was read: rebuild without it
            log.warning("%s; a rebuilt journal cannot tell which root was active", exc)
            return None
        return str((data or {}).get("default") or "") or None

    def create_root(self, ref: str, subject: Subject, key_type: KeyType, validity: Validity) -> CA:
        mount = self.cfg.root_mount
        existing = self._existing(mount, ref)
        if existing is not None:
            return existing
        # rotate/internal adds an issuer without touching the mount's default.
        data = self.client.write(
            f"{mount}/root/rotate/internal",
            f"generate root {ref} on {mount}",
            {
                "common_name": subject.common_name,
                "issuer_name": ref,
                "key_name": ref,
                "not_after": _rfc3339(validity.not_after),
                "max_path_length": 1,
                "exclude_cn_from_sans": True,
                **_KEY_PARAMS[key_type],
            },
        )
        if "private_key" in data:  # an "exported" call by mistake must never pass unnoticed
            raise AnchorError(f"{self.description}: root {ref} key was returned; refusing it")
        cert = parse_pem_certificates(data["certificate"], what=f"root {ref}")[0]
        return CA(ref, cert)

    def create_intermediate(self, ref: str, root: CA, subject: Subject, validity: Validity) -> CA:
        mount = self.cfg.kong_mount
        existing = self._existing(mount, ref)
        if existing is not None:
            return existing
        csr_data = self.client.write(
            f"{mount}/intermediate/generate/internal",
            f"generate the Kong intermediate key on {mount}",
            {"common_name": subject.common_name, "key_type": "ec", "key_bits": 256},
        )
        csr = x509.load_pem_x509_csr(csr_data["csr"].encode())
        cert = self.sign_ca(root, csr, subject, validity)
        imported = self.client.write(
            f"{mount}/intermediate/set-signed",
            f"import the Kong intermediate into {mount}",
            {"certificate": cert.public_bytes(serialization.Encoding.PEM).decode()},
        )
        issuer_ids = imported.get("imported_issuers") or []
        if not issuer_ids:
            raise AnchorError(f"{self.description}: {mount} imported no issuer for {ref}")
        self.client.request(
            "PATCH", f"{mount}/issuer/{issuer_ids[0]}", f"name issuer {ref}", {"issuer_name": ref}
        )
        return CA(ref, cert)

    def set_default(self, root: CA, intermediate: CA | None) -> None:
        for mount, ca in ((self.cfg.root_mount, root), (self.cfg.kong_mount, intermediate)):
            if ca is None:
                continue
            self.client.write(
                f"{mount}/config/issuers",
                f"make {ca.ref} the default issuer of {mount}",
                {"default": ca.ref},
            )

    def _sign(self, path: str, what: str, signer: CA, body: dict[str, Any]) -> x509.Certificate:
        data = self.client.write(path, what, body)
        cert = parse_pem_certificates(data["certificate"], what=what)[0]
        if not directly_issued_by(cert, signer.cert):
            raise AnchorError(f"{self.description}: {what}: not signed by {signer.ref}")
        return cert

    def sign_ca(
        self, root: CA, csr: x509.CertificateSigningRequest, subject: Subject, validity: Validity
    ) -> x509.Certificate:
        mount = self.cfg.root_mount
        return self._sign(
            f"{mount}/issuer/{root.ref}/sign-intermediate",
            f"sign {subject.common_name} with root {root.ref}",
            root,
            {
                "csr": _csr_pem(csr),
                "common_name": subject.common_name,
                "not_after": _rfc3339(validity.not_after),
                "max_path_length": 0,
                "exclude_cn_from_sans": True,
                "use_csr_values": False,
                "format": "pem",
            },
        )

    def sign_client(
        self,
        intermediate: CA,
        csr: x509.CertificateSigningRequest,
        subject: Subject,
        validity: Validity,
    ) -> x509.Certificate:
        mount = self.cfg.kong_mount
        return self._sign(
            f"{mount}/issuer/{intermediate.ref}/sign/{KONG_CLIENT_ROLE}",
            f"sign Kong client {subject.common_name} with {intermediate.ref}",
            intermediate,
            {
                "csr": _csr_pem(csr),
                "common_name": subject.common_name,
                "alt_names": ",".join(subject.dns_names),
                "uri_sans": ",".join(subject.uris),
                "not_after": _rfc3339(validity.not_after),
                "exclude_cn_from_sans": True,
                "format": "pem",
            },
        )

    # --- revocation ------------------------------------------------------------------------

    def _mount_of(self, ca: CA) -> str:
        return self.cfg.root_mount if ca.ref.startswith("root-") else self.cfg.kong_mount

    def revoke(self, cert: x509.Certificate, issuer: CA) -> None:
        """``<mount>/revoke`` with the certificate itself: the kong-client role does not
        store what it signs (``no_store``), and Vault revokes a certificate it did not
        store once it verifies the signature of one of the mount's issuers. Revoking it
        again is answered as already revoked."""
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        try:
            self.client.write(
                f"{self._mount_of(issuer)}/revoke",
                f"revoke serial {cert.serial_number:x} of {issuer.ref}",
                {"certificate": pem},
            )
        except AnchorError as exc:
            if "already revoked" not in str(exc):
                raise

    def crls(
        self, cas: Sequence[CA], now: datetime, rebuild: bool
    ) -> list[x509.CertificateRevocationList]:
        """Each issuer's CRL (``<mount>/issuer/<ref>/crl``); ``rebuild`` first asks each
        mount for fresh ones (``<mount>/crl/rotate``), as Vault does not rebuild a CRL that
        nears its next-update unless told to (``auto_rebuild`` is off by default)."""
        if rebuild:
            for mount in sorted({self._mount_of(ca) for ca in cas}):
                self.client.request("GET", f"{mount}/crl/rotate", f"rebuild the CRLs of {mount}")
        found = []
        for ca in cas:
            mount = self._mount_of(ca)
            data = self.client.read(f"{mount}/issuer/{ca.ref}/crl", f"read the CRL of {ca.ref}")
            if not data or not data.get("crl"):
                raise AnchorError(f"{self.description}: no CRL for {ca.ref} on {mount}")
            found.append(x509.load_pem_x509_crl(str(data["crl"]).encode()))
        return found
