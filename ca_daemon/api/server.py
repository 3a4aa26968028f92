"""The HTTP API: health, readiness, metrics, status, manual rotations (Starlette + uvicorn).

| method, path                  | auth   | answer                                              |
|-------------------------------|--------|-----------------------------------------------------|
| GET  /healthz                 | none   | 200 while the process is alive                      |
| GET  /readyz                  | none   | 200 once configuration, anchor and journal loaded   |
| GET  /metrics                 | none   | Prometheus text format                              |
| GET  /v1/status               | bearer | roots, issuers, clients, rotation, leader           |
| POST /v1/rotate               | bearer | 202 {"operation": id}; 400/401/403/409/413/503      |
| GET  /v1/operations/{id}      | bearer | the operation's progress and result; 404/503        |

Every call to ``/v1`` is written to the audit log, accepted or refused. A journal that
cannot be read or written is a 503 naming it (``journal``): a later call may succeed.
A standby answers every call as the leader does: it journals a request into the shared
journal (the leader carries it out at its next pass) and reads operations from there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from ca_daemon.api.audit import AuditLog, AuditRecord
from ca_daemon.api.auth import Authenticator, Decision
from ca_daemon.errors import RequestError, ServiceError
from ca_daemon.rotation.requests import RotationInProgress, UnknownTarget, advice
from ca_daemon.service.service import DaemonService, JournalOffline
from ca_daemon.util.logs import RateLimitedLog

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
_ROTATE_KEYS = {"target", "reason", "dry_run", "emergency", "revoke"}
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,128}")


class _Refused(RequestError):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _source(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@dataclass(frozen=True)
class _RotateBody:
    target: str
    reason: str
    dry_run: bool
    emergency: bool
    revoke: bool


async def _rotate_body(request: Request) -> _RotateBody:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise _Refused(413, f"request body over {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise _Refused(413, f"request body over {MAX_BODY} bytes")
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise _Refused(400, "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise _Refused(400, "the body must be a JSON object")
    unknown = sorted(set(data) - _ROTATE_KEYS)
    if unknown:
        raise _Refused(400, f"unknown field(s): {', '.join(unknown)}")
    target, reason, dry_run = data.get("target"), data.get("reason", ""), data.get("dry_run", False)
    if not isinstance(target, str) or not target:
        raise _Refused(400, "target is required: a string such as trust-anchor or kong/<name>")
    if not isinstance(reason, str) or len(reason) > 1024:
        raise _Refused(400, "reason must be a string of at most 1024 characters")
    if not isinstance(dry_run, bool):
        raise _Refused(400, "dry_run must be true or false")
    emergency, revoke = data.get("emergency", False), data.get("revoke", False)
    if not isinstance(emergency, bool):
        raise _Refused(400, "emergency must be true or false")
    if not isinstance(revoke, bool):
        raise _Refused(400, "revoke must be true or false")
    if (emergency or revoke) and not reason.strip():
        what = "an emergency" if emergency else "a revocation"
        raise _Refused(400, f"{what} needs a reason (which key leaked, how it was found)")
    return _RotateBody(target, reason, dry_run, emergency, revoke)


Handler = Callable[["Api", Request, dict[str, Any]], Awaitable[Response]]


def _audited(handler: Handler) -> Callable[[Api, Request], Awaitable[Response]]:
    """Run ``handler`` with a dict it fills for the audit line; refusals become their
    status code with a JSON error, and every outcome is audited."""

    async def wrapped(self: Api, request: Request) -> Response:
        note: dict[str, Any] = {"caller": "anonymous"}
        try:
            response = await handler(self, request, note)
            result = "accepted"
        except _Refused as refused:
            note.update(refused.extra)
            shown = {k: v for k, v in refused.extra.items() if k != "caller"}
            payload = {"error": str(refused), **shown}
            # RFC 6750: a 401 names the scheme it wants.
            challenge = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None
            response = JSONResponse(payload, status_code=refused.status, headers=challenge)
            result = str(refused)
        except Exception as exc:  # the API must answer, and say what failed
            log.exception("API %s %s failed", request.method, request.url.path)
            response = JSONResponse({"error": str(exc)}, status_code=500)
            result = f"error: {type(exc).__name__}"
        self.audit.write(
            AuditRecord(
                caller=note.get("caller", "anonymous"),
                source=_source(request),
                method=request.method,
                path=request.url.path,
                status=response.status_code,
                result=result,
                target=note.get("target"),
                reason=note.get("reason"),
                operation=note.get("operation"),
                emergency=bool(note.get("emergency")),
            )
        )
        return response

    return wrapped


@dataclass
class Api:
    service: DaemonService
    auth: Authenticator
    audit: AuditLog

    # --- unauthenticated ------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(self, request: Request) -> Response:
        reason = self.service.readiness()
        if reason is None:
            return PlainTextResponse("ready\n")
        return PlainTextResponse(f"not ready: {reason}\n", status_code=503)

    async def hello(self, request: Request) -> Response:
        """Who answers here: the daemon proves it holds the static token, for the nonce
        the client chose, before the client sends that token."""
        nonce = request.query_params.get("nonce", "")
        if not _NONCE.fullmatch(nonce):
            raise HTTPException(400, "nonce: 16 to 128 letters, digits, '-' or '_'")
        return JSONResponse({"daemon": "ca-daemon", "proof": self.auth.prove(nonce)})

    async def metrics(self, request: Request) -> Response:
        body = generate_latest(self.service.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # --- authenticated --------------------------------------------------------------------

    async def _authorize(self, request: Request, write: bool, emergency: bool = False) -> Decision:
        decision = await run_in_threadpool(self.auth.decide, _bearer(request), write, emergency)
        if not decision.allowed:
            status = decision.status if decision.status in (401, 403) else 503
            raise _Refused(status, decision.reason, caller=decision.user)
        return decision

    @_audited
    async def status(self, request: Request, note: dict[str, Any]) -> Response:
        note["caller"] = (await self._authorize(request, write=False)).user
        return JSONResponse(await run_in_threadpool(self.service.status))

    @_audited
    async def operation(self, request: Request, note: dict[str, Any]) -> Response:
        note["caller"] = (await self._authorize(request, write=False)).user
        op_id = request.path_params["op_id"]
        note["operation"] = op_id
        try:
            view = await run_in_threadpool(self.service.operation, op_id)
        except JournalOffline as exc:
            raise _Refused(503, str(exc), journal=exc.journal) from None
        if view is None:
            raise _Refused(404, f"no operation {op_id}")
        return JSONResponse(view)

    @_audited
    async def rotate(self, request: Request, note: dict[str, Any]) -> Response:
        note["caller"] = (await self._authorize(request, write=True)).user
        body = await _rotate_body(request)
        target, reason, emergency = body.target, body.reason, body.emergency
        note.update(target=target, reason=reason, emergency=emergency or body.revoke)
        if emergency or body.revoke:  # a permission of its own, asked once the body says so
            await self._authorize(request, write=True, emergency=True)
        # Any replica journals the request (check-and-set on the shared journal) or answers
        # a dry run; only the leader carries it out, at once or, asked here on a standby,
        # at its next pass.
        try:
            if body.dry_run:
                steps = await run_in_threadpool(
                    self.service.dry_run, target, reason, emergency, body.revoke
                )
                return JSONResponse(steps)
            op_id = await run_in_threadpool(
                self.service.request, target, reason, emergency, body.revoke
            )
        except UnknownTarget as exc:
            raise _Refused(400, str(exc)) from None
        except RotationInProgress as exc:
            raise _Refused(409, str(exc)) from None
        except JournalOffline as exc:
            raise _Refused(503, str(exc), journal=exc.journal) from None
        note["operation"] = op_id
        answer: dict[str, Any] = {"operation": op_id}
        said = advice(target, emergency)
        if said:
            answer["advice"] = said
        return JSONResponse(answer, status_code=202)


def build_app(service: DaemonService, auth: Authenticator, audit: AuditLog) -> Starlette:
    api = Api(service, auth, audit)
    return Starlette(
        routes=[
            Route("/healthz", api.healthz),
            Route("/readyz", api.readyz),
            Route("/metrics", api.metrics),
            Route("/v1/hello", api.hello),
            Route("/v1/status", api.status),
            Route("/v1/rotate", api.rotate, methods=["POST"]),
            Route("/v1/operations/{op_id}", api.operation),
        ],
        exception_handlers={HTTPException: _json_error},
    )


async def _json_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (404 no such path, 405 wrong method) as JSON, like ours."""
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


# What uvicorn does not bound by itself, for a daemon that may listen on 0.0.0.0: the
# connections held at once (each a file descriptor the passes need too), and how long a
# connection may take to send a request head. Idle keep-alive connections close after
# KEEP_ALIVE seconds (uvicorn's own timer, also armed before the first request here).
MAX_CONNECTIONS = 64
# Descriptors kept for everything else (journal, anchor, Kubernetes, Vault, logs).
RESERVED_FDS = 32
HEADER_TIMEOUT = 10.0
KEEP_ALIVE = 5
START_TIMEOUT = 10.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 with a connection cap and a deadline for each request head."""

    _refusals = RateLimitedLog(log, period=60.0)

    limit = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limit:
            self.transport = transport
            self._refusals.warning(
                "API: %d connections open, the most it keeps; closing new ones", self.limit
            )
            transport.abort()
            return
        super().connection_made(transport)
        # Idle before the first byte: closed like an idle keep-alive connection.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        waiting_after = self.cycle  # the next request replaces it once its head is read
        self.loop.call_later(HEADER_TIMEOUT, self._head_overdue, waiting_after)

    def _head_overdue(self, waiting_after: RequestResponseCycle | None) -> None:
        if self.cycle is waiting_after and not self.transport.is_closing():
            self.transport.close()


def connection_limit() -> int:
    """At most MAX_CONNECTIONS, and never so many that the passes run out of descriptors:
    a third of what is left after RESERVED_FDS (accepting takes a descriptor before the
    cap can close it, and a burst is accepted in batches)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(2, min(MAX_CONNECTIONS, (soft - RESERVED_FDS) // 3))


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is handed out (the token file, the
    "listening" line): a port someone else holds is an error, never a silent API-less run."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ApiUnavailable(
            f"the API cannot listen on {host}:{port}: {exc.strerror or exc}"
            " (server.address; another process may hold the port)"
        ) from None
    sock.set_inheritable(True)
    return sock


class ApiUnavailable(ServiceError):
    """The HTTP API could not start: the daemon stops rather than run without it."""


class ServerThread:
    """uvicorn in a thread beside the scheduler; ``stop`` lets it finish and joins.

    The socket is bound when this is made, so a port in use fails before anything else
    starts; ``start`` returns once the server accepts connections, or raises."""

    def __init__(self, app: Starlette, address: str) -> None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        self._socket = _bind(host, int(port))
        limit = connection_limit()
        config = uvicorn.Config(
            app,
            host=host,
            port=int(port),
            lifespan="off",
            access_log=False,
            log_config=None,  # the daemon's logging setup stays in charge
            log_level="warning",
            http=type("Guarded", (GuardedH11Protocol,), {"limit": limit}),
            timeout_keep_alive=KEEP_ALIVE,
            backlog=limit,  # also how many asyncio accepts in one go
        )
        self.server = uvicorn.Server(config)
        self.address = address
        self._thread = threading.Thread(target=self._serve, name="api", daemon=True)

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self._socket])
        except BaseException as exc:  # said by start() or, later, by the liveness check
            log.error("the API stopped: %s", exc)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ApiUnavailable(f"the API on {self.address} did not start")
            time.sleep(0.01)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
