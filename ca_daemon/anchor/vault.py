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

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_daemon.anchor.base import CA, AnchorError
from ca_daemon.anchor.records import Record, RecordConflict, RecordInvalid, check_key
from ca_daemon.anchor.vault_http import VaultHttp, VaultUnreachable
from ca_daemon.config import VaultAnchor
from ca_daemon.pki.bundle import parse_pem_certificates
from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.pki.keys import KeyType
from ca_daemon.pki.profiles import Subject, Validity
from ca_daemon.ratelimit import limiter

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


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise AnchorError(f"Vault auth: cannot read {what} {path}: {exc.strerror}") from exc
    if not value:
        raise AnchorError(f"Vault auth: {what} {path} is empty")
    return value


class VaultNotFound(AnchorError):
    pass


class VaultInvalidRequest(AnchorError):
    """Vault answered 400: the request itself was refused."""


class VaultForbidden(AnchorError):
    """Vault answered 403: the token is invalid or its policy denies the path."""


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten (in place or by rename); one stat call."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class VaultClient:
    """One narrow door to Vault: authenticated requests with errors an operator can act on.

    The token's life is kept here: its TTL and renewability come from the login answer
    (or ``lookup-self`` for a static token); before a request with less than a third
    of the TTL left it is renewed (``renew-self``) or, when renewal cannot carry it
    (not renewable, or capped by the max TTL), the client logs in again. A 403 whose
    token no longer looks itself up is answered by one new login and one retry. A
    ``token_file`` is re-read when it changes (a Vault Agent sidecar rewrites it).
    One lock guards login and renewal; the token never appears in a log or error.

    Logins, lookups and renewals go through hvac; every other request through one
    pooled connection set (``vault_http``) sized to the work's concurrency.
    """

    def __init__(
        self,
        cfg: VaultAnchor,
        env_token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        pool_size: int = 8,
    ) -> None:
        self.cfg = cfg
        self._env_token = env_token
        self._clock = clock
        verify: bool | str = str(cfg.ca_cert) if cfg.ca_cert else True
        timeout = cfg.timeout.total_seconds()
        self.hvac = hvac.Client(
            url=cfg.address, namespace=cfg.namespace, verify=verify, timeout=int(timeout)
        )
        self.http = VaultHttp(
            cfg.address,
            namespace=cfg.namespace,
            ca_cert=str(cfg.ca_cert) if cfg.ca_cert else None,
            timeout=timeout,
            pool_size=pool_size,
        )
        # Waited on by every request below (logins and renewals are not counted).
        self.limiter = limiter(cfg.qps, cfg.burst)
        self._logged_in = False
        self._lock = threading.RLock()
        self._generation = 0  # bumped on every new token: a racing thread does not log in twice
        self._ttl: float | None = None  # seconds the token lived when obtained; None: forever
        self._expires: float | None = None  # monotonic time the token stops working
        self._renewable = False
        self._token_file_seen: tuple[int, int, int] | None = None

    # --- the token's life -------------------------------------------------------------------

    def _login(self) -> None:
        auth = self.cfg.auth
        if auth.method == "token":
            if auth.token is not None:
                token = auth.token.get_secret_value()
            elif auth.token_file is not None:
                self._token_file_seen = _file_identity(auth.token_file)
                token = _read_secret_file(auth.token_file, "token_file")
            elif self._env_token:
                token = self._env_token
            else:
                raise AnchorError(
                    "Vault auth: method token needs anchor.vault.auth.token_file "
                    "(or VAULT_TOKEN in the environment)"
                )
            self.hvac.token = token
            looked = self._guard("token lookup", self.hvac.auth.token.lookup_self)
            data = (looked or {}).get("data") or {}
            self._set_lease(data.get("ttl"), data.get("renewable"))
        elif auth.method == "kubernetes":
            jwt = _read_secret_file(auth.jwt_file, "jwt_file")
            answer = self._guard(
                "kubernetes login",
                lambda: self.hvac.auth.kubernetes.login(
                    role=auth.role, jwt=jwt, mount_point=auth.mount or "kubernetes"
                ),
            )
            self._set_lease_from(answer)
        else:
            assert auth.secret_id_file is not None
            secret_id = _read_secret_file(auth.secret_id_file, "secret_id_file")
            answer = self._guard(
                "approle login",
                lambda: self.hvac.auth.approle.login(
                    role_id=auth.role_id, secret_id=secret_id, mount_point=auth.mount or "approle"
                ),
            )
            self._set_lease_from(answer)
        self._logged_in = True
        self._generation += 1

    def _set_lease_from(self, answer: Any) -> None:
        auth = (answer or {}).get("auth") or {}
        self._set_lease(auth.get("lease_duration"), auth.get("renewable"))

    def _set_lease(self, ttl: Any, renewable: Any) -> None:
        seconds = float(ttl or 0)
        if seconds <= 0:  # a root or periodic-less token without expiry
            self._ttl = self._expires = None
        else:
            self._ttl = seconds
            self._expires = self._clock() + seconds
        self._renewable = bool(renewable)

    def _needs_refresh(self) -> bool:
        if self._expires is None or self._ttl is None:
            return False
        return self._expires - self._clock() < self._ttl / 3

    def _token_file_changed(self) -> bool:
        auth = self.cfg.auth
        if auth.method != "token" or auth.token is not None or auth.token_file is None:
            return False
        return _file_identity(auth.token_file) != self._token_file_seen

    def _ensure_token(self) -> int:
        """Log in, re-read or renew as the token needs; the generation of the token in use."""
        if self._logged_in and not self._token_file_changed() and not self._needs_refresh():
            return self._generation
        with self._lock:
            if not self._logged_in:
                self._login()
            elif self._token_file_changed():
                log.info("Vault auth: %s changed; using the new token", self.cfg.auth.token_file)
                self._login()
            elif self._needs_refresh():
                self._refresh()
            return self._generation

    def _refresh(self) -> None:
        """Renew when that extends the token past the threshold, else log in again."""
        if self._renewable:
            try:
                answer = self._guard("token renewal", self.hvac.auth.token.renew_self)
            except AnchorError as exc:
                log.warning("Vault auth: renewing the token failed (%s); logging in again", exc)
            else:
                self._set_lease_from_renewal(answer)
                if not self._needs_refresh():
                    log.debug("Vault auth: token renewed")
                    return
        if self.cfg.auth.method == "token":
            # A given token cannot be replaced from here: use it while it lasts (a
            # token_file is re-read when whoever manages it writes a new one); stop
            # asking until a new token arrives.
            self._expires = None
            return
        log.info("Vault auth: token near its end and cannot be renewed further; logging in again")
        self._login()

    def _set_lease_from_renewal(self, answer: Any) -> None:
        auth = (answer or {}).get("auth") or {}
        seconds = float(auth.get("lease_duration") or 0)
        self._expires = self._clock() + seconds if seconds > 0 else None
        if seconds <= 0:
            self._ttl = None
        self._renewable = bool(auth.get("renewable"))

    def _token_rejected(self) -> bool:
        """After a 403: whether the token itself is no longer valid (it cannot look itself
        up), as opposed to a policy that denies this one path."""
        try:
            self.hvac.auth.token.lookup_self()
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            return True
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException):
            return False
        return False

    def _login_again(self, seen: int) -> bool:
        """Log in once more unless another thread already did since ``seen``."""
        with self._lock:
            if self._generation != seen:
                return True
            if not self._token_rejected():
                return False
            log.warning("Vault auth: the token is no longer valid; logging in again")
            self._login()
            return True

    def _guard(self, what: str, call: Any) -> Any:
        where = f"Vault at {self.cfg.address}"
        try:
            return call()
        except hvac.exceptions.InvalidPath as exc:
            raise VaultNotFound(f"{where}: {what}: not found ({_first_error(exc)})") from None
        except hvac.exceptions.InvalidRequest as exc:
            raise VaultInvalidRequest(f"{where}: {what}: {_first_error(exc)}") from None
        except hvac.exceptions.Forbidden as exc:
            raise VaultForbidden(
                f"{where}: {what}: permission denied — check the token and its policy "
                f"({_first_error(exc)})"
            ) from None
        except hvac.exceptions.Unauthorized as exc:
            raise AnchorError(f"{where}: {what}: not authenticated ({_first_error(exc)})") from None
        except hvac.exceptions.VaultError as exc:
            raise AnchorError(f"{where}: {what}: {_first_error(exc)}") from None
        except (requests.exceptions.RequestException, VaultUnreachable) as exc:
            kind = str(exc) if isinstance(exc, VaultUnreachable) else type(exc).__name__
            raise AnchorError(
                f"{where}: {what}: unreachable ({kind}) — is the address right and the server up?"
            ) from None

    def request(self, method: str, path: str, what: str, body: dict[str, Any] | None = None) -> Any:
        seen = self._ensure_token()
        url = f"v1/{path}"
        if self.limiter is not None:
            self.limiter.acquire()

        def call() -> Any:
            return self.http.request(method, url, self.hvac.token, body)

        try:
            return self._guard(what, call)
        except VaultForbidden:
            if not self._login_again(seen):
                raise
        return self._guard(what, call)

    def read(self, path: str, what: str) -> dict[str, Any] | None:
        """GET ``path``; None when Vault says it does not exist."""
        try:
            response = self.request("GET", path, what)
        except VaultNotFound:
            return None
        except AnchorError as exc:
            if "unable to find" in str(exc):  # PKI answers 500 for an unknown issuer reference
                return None
            raise
        if response is None:
            return None
        data: dict[str, Any] = response.get("data") or {}
        return data

    def write(self, path: str, what: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.request("POST", path, what, body)
        return dict((response or {}).get("data") or {})


def _first_error(exc: hvac.exceptions.VaultError) -> str:
    errors = getattr(exc, "errors", None)
    if errors:
        return "; ".join(str(e) for e in errors)
    return str(exc) or type(exc).__name__


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


class VaultKvStore:
    """The journal's records in Vault KV v2 under ``state_path``, written with ``cas``."""

    def __init__(self, client: VaultClient, mount: str, path: str) -> None:
        self.client = client
        self.mount = mount
        self.base = path.strip("/")
        self.description = f"Vault KV {mount}/{self.base}"

    def _path(self, key: str) -> str:
        parts = check_key(key)
        return "/".join([self.base, *parts])

    def _version(self, key: str) -> int:
        meta = self.client.read(f"{self.mount}/metadata/{self._path(key)}", "read state metadata")
        return int((meta or {}).get("current_version") or 0)

    def read(self, key: str) -> tuple[Record, int] | None:
        data = self.client.read(f"{self.mount}/data/{self._path(key)}", "read the state")
        if not data or not data.get("data"):  # absent, or its latest version deleted
            return None
        version = int((data.get("metadata") or {}).get("version") or 0)
        record = data["data"].get("state")
        if not isinstance(record, dict):
            raise RecordInvalid(f"{self.description}: {key or 'state'}: no state in the secret")
        return record, version

    def write(self, key: str, record: Record, version: int) -> int:
        try:
            return self._write(key, record, version)
        except VaultInvalidRequest:
            pass
        # KV v2 says a check-and-set mismatch only in prose; decide by the stored version.
        current = self._version(key)
        if version == 0 and current and self.read(key) is None:
            # "Does not exist" includes a secret whose latest version was deleted or
            # destroyed: KV keeps counting, so creating it names that version.
            return self._write(key, record, current)
        if current != version:
            raise RecordConflict(
                f"{self.description}: {key or 'state'} is at version {current}, expected {version}"
            )
        return self._write(key, record, version)  # a passing refusal: say it if it repeats

    def _write(self, key: str, record: Record, cas: int) -> int:
        """One write with ``cas``; the common case (a new or current record) costs one request."""
        path = f"{self.mount}/data/{self._path(key)}"
        body = {"options": {"cas": cas}, "data": {"state": record}}
        data = self.client.write(path, "save the state", body)
        return int(data.get("version") or cas + 1)

    def delete(self, key: str) -> None:
        path = f"{self.mount}/metadata/{self._path(key)}"
        with contextlib.suppress(VaultNotFound):
            self.client.request("DELETE", path, "delete a state record")

    def list(self, folder: str) -> list[str]:
        path = f"{self.mount}/metadata/{self._path(folder)}/"
        try:
            response = self.client.request("LIST", path, "list state records")
        except VaultNotFound:
            return []
        keys = ((response or {}).get("data") or {}).get("keys") or []
        return sorted(k for k in keys if not k.endswith("/"))
