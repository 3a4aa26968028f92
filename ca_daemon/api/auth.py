"""Who may call the API: a static bearer token, or Kubernetes' own authn and authz.

``static``: the token in ``server.token_file`` (the embedded default generates one,
0600), compared in constant time. ``kubernetes``: a TokenReview says who the bearer
is, then a SubjectAccessReview asks whether that user may ``server.sar`` (by default
``create rotations.ca-daemon.io``) in the daemon's namespace, as kube-rbac-proxy
does; reading (status, operations) asks for ``get`` on the same resource, and an
emergency root rotation for ``server.sar.emergency_verb`` (``emergency``) as well. Decisions
are cached briefly by the token's hash, never by the token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ca_daemon.config.settings import ServerSar, Settings
from ca_daemon.errors import KubeError
from ca_daemon.util.kube import api_client, call

log = logging.getLogger(__name__)
_CACHE_SECONDS = 10.0


@dataclass(frozen=True)
class Decision:
    """``status`` 200 (allowed), 401 (who are you?) or 403 (not allowed); ``user`` for the
    audit log, never the token."""

    status: int
    user: str
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.status == 200


class Authenticator(Protocol):
    description: str

    def decide(self, token: str | None, write: bool, emergency: bool = False) -> Decision:
        """``write``: the call changes something (a rotation), else it only reads;
        ``emergency``: it asks for an emergency rotation, a permission of its own."""

    def prove(self, nonce: str) -> str | None:
        """Proof that this daemon holds the token a client would send (None: no such
        proof with this method), so a client can check it talks to the right daemon
        before the token leaves it."""


PROOF_CONTEXT = b"ca-daemon API proof:"


def proof(token: str, nonce: str) -> str:
    """HMAC-SHA256 of ``nonce`` under the token, in a context of its own (never a token)."""
    return hmac.new(token.encode(), PROOF_CONTEXT + nonce.encode(), hashlib.sha256).hexdigest()


def ensure_token_file(path: Path) -> bool:
    """Create a random API token at ``path`` (0600) unless one exists; True if created."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return True


class StaticTokenAuth:
    """One shared bearer token, read from its file on each call so a rotated file is
    picked up without a restart.

    The file is trusted only as this daemon made it: a regular file (not a symlink)
    owned by this uid, readable by no one else. A file that is gone, unreadable or
    untrusted is said in the log (once until it is back) and the token last read from a
    trusted file stays in force; the caller is only ever told its token is invalid."""

    def __init__(self, token_file: Path) -> None:
        self.token_file = token_file
        self.description = f"static token {token_file}"
        self._last: str | None = None
        self._problem: str | None = None  # what was last logged about the file
        self._lock = threading.Lock()

    def decide(self, token: str | None, write: bool, emergency: bool = False) -> Decision:
        # One token holds every permission: whoever can read it can ask for anything.
        if not token:
            return Decision(401, "anonymous", "no bearer token")
        expected = self._expected()
        if expected and hmac.compare_digest(token.encode(), expected.encode()):
            return Decision(200, "static-token")
        return Decision(401, "unknown", "invalid token")

    def prove(self, nonce: str) -> str | None:
        expected = self._expected()
        return proof(expected, nonce) if expected else None

    def _expected(self) -> str | None:
        try:
            text, problem = _read_trusted(self.token_file), None
        except (OSError, ValueError) as exc:
            text, problem = None, str(exc)
        with self._lock:
            if problem is None and text:
                self._last = text
                if self._problem is not None:
                    log.info("API token file %s is usable again", self.token_file)
            elif problem != self._problem:
                kept = "keeping the token read before" if self._last else "refusing every call"
                log.error("API token file %s: %s; %s", self.token_file, problem, kept)
            self._problem = problem
            return self._last


def _read_trusted(path: Path) -> str:
    """The token in ``path``, or ValueError/OSError saying why it is not trusted."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_uid != os.geteuid():
            raise ValueError(f"owned by uid {info.st_uid}, not this daemon's {os.geteuid()}")
        if info.st_mode & 0o077:
            raise ValueError(f"mode {info.st_mode & 0o777:04o}: others may read or change it")
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    if not text:
        raise ValueError("empty")
    return text


class KubernetesAuth:
    """TokenReview, then SubjectAccessReview for ``server.sar`` in ``namespace``."""

    def __init__(self, api: Any, sar: ServerSar, namespace: str) -> None:
        from kubernetes import client

        self.authn = client.AuthenticationV1Api(api)
        self.authz = client.AuthorizationV1Api(api)
        self.sar = sar
        self.namespace = namespace
        self.description = f"kubernetes ({sar.verb} {sar.resource}.{sar.group} in {namespace})"
        self._cache: dict[str, tuple[float, Decision]] = {}
        self._lock = threading.Lock()

    def prove(self, nonce: str) -> str | None:
        return None  # the caller's own Kubernetes token: nothing of it is shared here

    def decide(self, token: str | None, write: bool, emergency: bool = False) -> Decision:
        if not token:
            return Decision(401, "anonymous", "no bearer token")
        verb = self.sar.emergency_verb if emergency else self.sar.verb if write else "get"
        key = f"{verb}:{hashlib.sha256(token.encode()).hexdigest()}"
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and now - cached[0] < _CACHE_SECONDS:
                return cached[1]
        decision = self._review(token, verb)
        if decision.status != 503:  # an unreachable apiserver is not remembered
            with self._lock:
                self._cache = {k: v for k, v in self._cache.items() if now - v[0] < _CACHE_SECONDS}
                self._cache[key] = (now, decision)
        return decision

    def _review(self, token: str, verb: str) -> Decision:
        try:
            review = call(
                "TokenReview",
                self.authn.create_token_review,
                {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "spec": {"token": token},
                },
            )
        except KubeError as exc:
            return Decision(503, "unknown", f"cannot review the token: {exc}")
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            return Decision(401, "unknown", "token not authenticated by Kubernetes")
        user = status.user.username or "unknown"
        spec = {
            "user": user,
            "groups": list(status.user.groups or []),
            "uid": status.user.uid,
            "extra": {k: list(v) for k, v in (status.user.extra or {}).items()},
            "resourceAttributes": {
                "namespace": self.namespace,
                "group": self.sar.group,
                "resource": self.sar.resource,
                "verb": verb,
            },
        }
        try:
            access = call(
                "SubjectAccessReview",
                self.authz.create_subject_access_review,
                {
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SubjectAccessReview",
                    "spec": spec,
                },
            )
        except KubeError as exc:
            return Decision(503, user, f"cannot review access: {exc}")
        if access.status is not None and access.status.allowed:
            return Decision(200, user)
        what = f"{verb} {self.sar.resource}.{self.sar.group} in {self.namespace}"
        return Decision(403, user, f"{user} may not {what}")


def authenticator(settings: Settings) -> Authenticator:
    if settings.server.auth == "kubernetes":
        return KubernetesAuth(api_client(), settings.server.sar, settings.daemon_namespace)
    return StaticTokenAuth(settings.api_token_file)
