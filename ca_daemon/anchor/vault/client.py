"""Vault / OpenBao: one authenticated client that keeps its token alive and names errors."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests

from ca_daemon.anchor.vault.http import VaultHttp, VaultUnreachable
from ca_daemon.config.settings import VaultAnchor
from ca_daemon.errors import AnchorError, VaultError
from ca_daemon.util.ratelimit import limiter

log = logging.getLogger(__name__)


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise AnchorError(f"Vault auth: cannot read {what} {path}: {exc.strerror}") from exc
    if not value:
        raise AnchorError(f"Vault auth: {what} {path} is empty")
    return value


class VaultNotFound(VaultError):
    pass


class VaultInvalidRequest(VaultError):
    """Vault answered 400: the request itself was refused."""


class VaultForbidden(VaultError):
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
