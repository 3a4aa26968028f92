"""The CLI's side of the HTTP API: `status --url` and `rotate`."""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ca_daemon.api.auth import proof
from ca_daemon.config.settings import Settings
from ca_daemon.errors import ApiError

POLL_SECONDS = 1.0


# How long `rotate --wait` keeps polling through a daemon that answers 503 (its journal
# unavailable) or cannot be reached (a Pod replaced mid-failover), before it gives up.
TRANSIENT_SECONDS = 300.0


def default_url(settings: Settings) -> str:
    host, _, port = settings.server.address.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):  # listening everywhere: talk to it locally
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ApiError(f"cannot read the API token {path}: {exc.strerror}") from None
    if not token:
        raise ApiError(f"the API token file {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ApiError(
            f"the API token file {path} does not hold one token (it has spaces or lines)"
        )
    return token


class DaemonUnreachable(ApiError):
    """Nothing answered at the URL (refused, timed out, not HTTP)."""


@dataclass
class Client:
    """``expect_proof``: the daemon uses the static token; before the token is sent the
    server must prove it holds the same one (so a process squatting on the daemon's
    port never receives it)."""

    url: str
    token: str
    expect_proof: bool = False
    _proven: bool = field(default=False, init=False, repr=False)

    def _check_proof(self) -> None:
        if not self.expect_proof or self._proven:
            return
        nonce = secrets.token_urlsafe(24)
        try:
            response = httpx.get(
                f"{self.url.rstrip('/')}/v1/hello", params={"nonce": nonce}, timeout=30
            )
            answer = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError) as exc:
            raise DaemonUnreachable(f"{self.url}: unreachable ({type(exc).__name__})") from None
        given = answer.get("proof") if isinstance(answer, dict) else None
        if given is None and isinstance(answer, dict) and answer.get("daemon") == "ca-daemon":
            # A daemon with server.auth=kubernetes shares no token it could prove; this CLI
            # was configured for a static one (often: no --config, the embedded default).
            raise ApiError(
                f"{self.url} proves no static token (it uses server.auth=kubernetes?): run "
                "with a --config that sets server.auth: kubernetes to send it your "
                "Kubernetes token; the token was not sent"
            )
        if not isinstance(given, str) or not hmac.compare_digest(given, proof(self.token, nonce)):
            raise ApiError(
                f"{self.url} did not prove it holds this API token: it may not be the "
                "ca-daemon you mean (another process on that port, or another daemon's "
                "token file); the token was not sent"
            )
        self._proven = True

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        self._check_proof()
        try:
            response = httpx.request(
                method,
                f"{self.url.rstrip('/')}{path}",
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=30,
            )
        except httpx.HTTPError as exc:
            raise DaemonUnreachable(f"{self.url}: unreachable ({type(exc).__name__})") from None
        try:
            data = response.json()
        except ValueError:
            data = {"error": response.text.strip()[:300]}
        if response.status_code >= 400:
            raise ApiError(
                f"{method} {path}: {response.status_code}: {data.get('error', data)}",
                response.status_code,
            )
        return data

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self._call("GET", "/v1/status")
        return data

    def rotate(
        self,
        target: str,
        reason: str,
        dry_run: bool,
        emergency: bool = False,
        revoke: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"target": target, "reason": reason, "dry_run": dry_run}
        # Only when asked: a daemon of an earlier release refuses keys it does not know.
        if emergency:
            body["emergency"] = True
        if revoke:
            body["revoke"] = True
        data: dict[str, Any] = self._call("POST", "/v1/rotate", body)
        return data

    def operation(self, op_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self._call("GET", f"/v1/operations/{op_id}")
        return data

    def follow(
        self,
        op_id: str,
        say: Callable[[str], None],
        sleep: Callable[[float], None] = time.sleep,
        until: str = "end",
        clock: Callable[[], float] = time.monotonic,
    ) -> dict[str, Any]:
        """Poll the operation until it ends, saying each change of progress once;
        ``until="effect"``: a root rotation only until it is in effect (the new root signs
        everything and the old one's retirement is scheduled), which is weeks earlier.

        The operation is journaled, so a daemon that is briefly unavailable (a failover, a
        Vault restart) is waited for, up to TRANSIENT_SECONDS in a row, counted on the
        clock: a poll of a vanished address can itself take a whole request timeout.
        """
        last = ""
        unavailable_since: float | None = None
        while True:
            try:
                view = self.operation(op_id)
            except ApiError as exc:
                now = clock()
                if unavailable_since is None:
                    unavailable_since = now
                if not exc.transient or now - unavailable_since >= TRANSIENT_SECONDS:
                    raise
                line = f"{exc}; still waiting"
                if line != last:
                    say(line)
                    last = line
                sleep(POLL_SECONDS)
                continue
            unavailable_since = None
            line = _progress(view)
            if line != last:
                say(line)
                last = line
            if view["state"] in ("succeeded", "failed"):
                return view
            if until == "effect" and view.get("phase") == "retiring":
                return view
            sleep(POLL_SECONDS)


def _progress(view: dict[str, Any]) -> str:
    parts = [f"{view['target']}: {view['state']}"]
    if view.get("phase"):
        parts.append(f"phase {view['phase']}")
    if view.get("waiting_for"):
        parts.append(f"waiting for {view['waiting_for']}")
    if view.get("pending_pods"):
        parts.append(f"pods on an old bundle: {', '.join(view['pending_pods'])}")
    if view.get("result"):
        parts.append(str(view["result"]))
    return "; ".join(parts)
