"""The long-running service: a scheduler that reconciles every check_interval, and the
HTTP API beside it."""

from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, Protocol

from apscheduler.schedulers.blocking import BlockingScheduler

from ca_daemon.api.audit import AuditLog
from ca_daemon.api.auth import StaticTokenAuth, authenticator, ensure_token_file
from ca_daemon.api.server import ServerThread, build_app
from ca_daemon.config.settings import Settings
from ca_daemon.errors import ServiceError
from ca_daemon.report.status import notes
from ca_daemon.rotation.engine import Engine
from ca_daemon.service.leader import LeaderElector, build_elector
from ca_daemon.service.metrics import Metrics
from ca_daemon.service.service import DaemonService, Leadership

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


class Scheduler(Protocol):
    """What the loop needs of APScheduler's BlockingScheduler (a test passes its own)."""

    def add_job(self, func: Callable[[], None], trigger: str, **kwargs: Any) -> Any: ...

    def start(self) -> None: ...

    def shutdown(self, wait: bool = True) -> None: ...

    def modify_job(self, job_id: str, **changes: Any) -> Any: ...


BACKOFF_START = timedelta(seconds=2)
# Until the daemon was ready once, failed passes are retried at least this often: a Pod
# that just started often finds Vault or the API server a few seconds away, and its
# readiness waits on the retry (the usual backoff would put it 30-60 s out).
STARTUP_RETRY_CAP = timedelta(seconds=8)


@dataclass
class Backoff:
    """After a failed pass the next one comes sooner than the interval, then later and
    later: ``start`` doubling with each failure in a row, up to ``cap``, each delay
    jittered down by up to ``jitter`` (so replicas and retries spread out). A pass that
    succeeds resets it."""

    start: float
    cap: float
    jitter: float = 0.2
    failures: int = 0
    rand: Callable[[], float] = random.random

    def after(self, ok: bool) -> float | None:
        """The delay before the next pass, or None: the usual interval."""
        if ok:
            self.failures = 0
            return None
        self.failures += 1
        delay = min(self.cap, self.start * 2 ** min(self.failures - 1, 30))
        return float(delay * (1 - self.jitter * self.rand()))


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
    metrics = metrics or Metrics()
    service = DaemonService(settings, engine, metrics, clock or engine.clock)
    # Bound first: a port in use stops the daemon before a token is written or a pass runs.
    server = _listen(settings, service, server_address) if server_address else None
    interval = settings.rotation.check_interval.total_seconds()
    backoff = Backoff(min(BACKOFF_START.total_seconds(), interval), interval)
    loop: Scheduler = scheduler or BlockingScheduler(timezone=UTC)

    in_pass = threading.Lock()

    def tick() -> None:
        if server is not None and not server.alive:
            log.error("the API on %s stopped; stopping the daemon", server.address)
            loop.shutdown(wait=False)
            return
        with in_pass:
            _tick()

    def _tick() -> None:
        result = service.tick()
        if elector is not None:
            metrics.leader.set(1 if service.leadership.leader else 0)
        failed_before = backoff.failures
        delay = backoff.after(result.ok)
        if delay is not None and service.readiness() is not None:
            delay = min(delay, STARTUP_RETRY_CAP.total_seconds())
        metrics.consecutive_failures.set(backoff.failures)
        metrics.backoff.set(delay or 0)
        if delay is not None:
            log.warning("pass failed (%d in a row); retrying in %.1fs", backoff.failures, delay)
            at = datetime.now(UTC) + timedelta(seconds=delay)
            loop.modify_job("reconcile", next_run_time=at)
        elif failed_before:
            log.info(
                "pass succeeded after %d failed; checking every %ss again",
                failed_before,
                int(interval),
            )

    # A manual request is journaled by the API; the pass that carries it out runs now.
    service.on_wake(lambda: loop.modify_job("reconcile", next_run_time=datetime.now(UTC)))
    elector = _elector(settings, service, metrics)
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
    for note in notes(settings):
        log.warning("%s", note)
    log.info(
        "ca-daemon running: anchor %s, checking every %ss",
        engine.anchor.description,
        int(settings.rotation.check_interval.total_seconds()),
    )
    if server is not None:
        server.start()
        log.info("API listening on http://%s", server.address)
    if elector is not None:
        elector.start()
    try:
        loop.start()
    finally:
        if elector is not None:
            # The scheduler does not wait for the pass in flight; the Lease is handed over
            # only once it ended, or a standby would run beside it.
            finished = in_pass.acquire(
                timeout=settings.leader_election.lease_duration.total_seconds() * 4
            )
            elector.stop(release=finished)  # a standby takes over at its next retry
        api_died = server is not None and not server.alive  # started above, or raised
        if server is not None:
            server.stop()
        # In-process callers (tests, an embedding program) get their handlers back.
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if api_died:
        raise ServiceError(f"the API on {server_address} stopped while the daemon ran")


def _elector(settings: Settings, service: DaemonService, metrics: Metrics) -> LeaderElector | None:
    """The Lease elector when leader election is on (else this process leads)."""

    if not settings.leader_election_enabled:
        metrics.leader.set(1)
        return None
    metrics.leader.set(0)
    lock = threading.Lock()
    leading = [False]

    def changed(leader: bool, holder: str | None) -> None:
        metrics.leader.set(1 if leader else 0)
        with lock:
            started, leading[0] = leader and not leading[0], leader
        if started:
            try:  # the new leader's first pass runs now, not at the next check
                service.wake()
            except Exception as exc:  # the scheduler not started yet: it runs at once anyway
                log.debug("waking the loop: %s", exc)

    elector = build_elector(settings, changed)
    service.follow_leadership(lambda: Leadership(elector.is_leader(), elector.holder()))
    log.info("leader election on %s as %s", elector.store.description, elector.identity)
    return elector


def _listen(settings: Settings, service: DaemonService, address: str) -> ServerThread:
    """Bind the API's port, then (only then) make sure the token file exists."""
    auth = authenticator(settings)
    audit = AuditLog(reads=settings.server.audit_reads)
    server = ServerThread(build_app(service, auth, audit), address)
    if isinstance(auth, StaticTokenAuth):
        created = ensure_token_file(auth.token_file)
        log.info("API token %s: %s", "created in" if created else "read from", auth.token_file)
    log.info("API auth: %s", auth.description)
    return server
