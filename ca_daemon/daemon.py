"""The long-running service: a scheduler that reconciles every check_interval."""

from __future__ import annotations

import logging
import signal
from datetime import UTC, datetime
from types import FrameType

from apscheduler.schedulers.blocking import BlockingScheduler

from ca_daemon.config import Settings
from ca_daemon.metrics import Metrics
from ca_daemon.rotation.engine import Engine

log = logging.getLogger(__name__)


def run_forever(settings: Settings, engine: Engine, metrics: Metrics | None = None) -> None:
    """Reconcile now and then every ``rotation.check_interval`` until SIGTERM/SIGINT."""
    metrics = metrics or Metrics()

    def tick() -> None:
        result = engine.reconcile()
        for error in result.errors:
            log.error("%s", error)
        metrics.observe(result, settings, datetime.now(UTC))

    scheduler = BlockingScheduler(timezone=UTC)
    scheduler.add_job(
        tick,
        "interval",
        seconds=settings.rotation.check_interval.total_seconds(),
        next_run_time=datetime.now(UTC),
        max_instances=1,
        coalesce=True,
        id="reconcile",
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        scheduler.shutdown(wait=False)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "ca-daemon running: anchor %s, checking every %ss",
        engine.anchor.description,
        int(settings.rotation.check_interval.total_seconds()),
    )
    scheduler.start()
