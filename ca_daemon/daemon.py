"""The long-running service: a scheduler that reconciles every check_interval."""

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

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


class Scheduler(Protocol):
    """What the loop needs of APScheduler's BlockingScheduler (a test passes its own)."""

    def add_job(self, func: Callable[[], None], trigger: str, **kwargs: Any) -> Any: ...

    def start(self) -> None: ...

    def shutdown(self, wait: bool = True) -> None: ...


def run_forever(
    settings: Settings,
    engine: Engine,
    metrics: Metrics | None = None,
    *,
    clock: Clock | None = None,
    scheduler: Scheduler | None = None,
) -> None:
    """Reconcile now and then every ``rotation.check_interval`` until SIGTERM/SIGINT.

    ``clock`` (default: the engine's) is the time every pass decides and reports with;
    ``scheduler`` decides when passes run. A test gives both, so renewals that take
    days of clock time are tested in a moment, deterministically.
    """
    metrics = metrics or Metrics()
    now_of = clock or engine.clock

    def tick() -> None:
        now = now_of()
        result = engine.reconcile(now=now)
        for error in result.errors:
            log.error("%s", error)
        metrics.observe(result, settings, now)

    loop: Scheduler = scheduler or BlockingScheduler(timezone=UTC)
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
    try:
        loop.start()
    finally:
        # In-process callers (tests, an embedding program) get their handlers back.
        for sig, handler in previous.items():
            signal.signal(sig, handler)
