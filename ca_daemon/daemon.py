"""The long-running service: a scheduler that reconciles every check_interval, and the
HTTP API beside it."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Protocol

from apscheduler.schedulers.blocking import BlockingScheduler

from ca_daemon.config import Settings
from ca_daemon.metrics import Metrics
from ca_daemon.rotation.engine import Engine
from ca_daemon.server import ServerThread
from ca_daemon.service import DaemonService

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


class Scheduler(Protocol):
    """What the loop needs of APScheduler's BlockingScheduler (a test passes its own)."""

    def add_job(self, func: Callable[[], None], trigger: str, **kwargs: Any) -> Any: ...

    def start(self) -> None: ...

    def shutdown(self, wait: bool = True) -> None: ...

    def modify_job(self, job_id: str, **changes: Any) -> Any: ...


def run_forever(
    settings: Settings,
    engine: Engine,
    metrics: Metrics | None = None,
    *,
    clock: Clock | None = None,
    scheduler: Scheduler | None = None,
    server_address: str | None = None,
) -> None:
    """Reconcile now and then every ``rotation.check_interval`` until SIGTERM/SIGINT.

    ``clock`` (default: the engine's) is the time every pass decides and reports with;
    ``scheduler`` decides when passes run. A test gives both, so renewals that take
    days of clock time are tested in a moment, deterministically. With
    ``server_address`` the HTTP API listens there while the loop runs.
    """
    service = DaemonService(settings, engine, metrics or Metrics(), clock or engine.clock)

    def tick() -> None:
        service.tick()

    loop: Scheduler = scheduler or BlockingScheduler(timezone=UTC)
    # A manual request is journaled by the API; the pass that carries it out runs now.
    service.on_wake(lambda: loop.modify_job("reconcile", next_run_time=datetime.now(UTC)))
    loop.add_job(
        tick,
        "interval",
        seconds=settings.rotation.check_interval.total_seconds(),
        next_run_time=datetime.now(UTC),  # the scheduler's own (real) time: run at once
        max_instances=1,
        coalesce=True,
        id="reconcile",
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        loop.shutdown(wait=False)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info(
        "ca-daemon running: anchor %s, checking every %ss",
        engine.anchor.description,
        int(settings.rotation.check_interval.total_seconds()),
    )
    server = _start_server(settings, service, server_address) if server_address else None
    try:
        loop.start()
    finally:
        if server is not None:
            server.stop()
        # In-process callers (tests, an embedding program) get their handlers back.
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_server(settings: Settings, service: DaemonService, address: str) -> ServerThread:
    from ca_daemon.api_auth import StaticTokenAuth, authenticator, ensure_token_file
    from ca_daemon.audit import AuditLog
    from ca_daemon.server import build_app

    auth = authenticator(settings)
    if isinstance(auth, StaticTokenAuth):
        created = ensure_token_file(auth.token_file)
        log.info("API token %s: %s", "created in" if created else "read from", auth.token_file)
    server = ServerThread(build_app(service, auth, AuditLog()), address)
    server.start()
    log.info("API listening on http://%s (auth: %s)", address, auth.description)
    return server
