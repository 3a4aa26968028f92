"""Until the daemon was ready once, a failed pass is retried within STARTUP_RETRY_CAP, not
after the usual backoff (which doubles to ``check_interval``): a Pod whose Vault or API
server is a few seconds away at start is Ready soon after they answer. Once it was ready,
failures back off as before. The loop runs in-process with a scheduler that only records
when the next pass was asked for."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ca_daemon.config.loading import load_settings
from ca_daemon.daemon import STARTUP_RETRY_CAP, run_forever
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.results import PassResult
from ca_daemon.service.wiring import build_engine
from tests.support.settings import local_config

pytestmark = pytest.mark.usefixtures("clean_env")


@dataclass
class RecordingScheduler:
    """Runs the pass ``passes`` times; notes each retry delay the loop asks for."""

    passes: int
    delays: list[float] = field(default_factory=list)
    job: Callable[[], None] | None = None

    def add_job(self, func: Callable[[], None], trigger: str, **kwargs: Any) -> None:
        self.job = func

    def start(self) -> None:
        assert self.job is not None
        for _ in range(self.passes):
            self.job()

    def shutdown(self, wait: bool = True) -> None:
        pass

    def modify_job(self, job_id: str, **changes: Any) -> None:
        at: datetime = changes["next_run_time"]
        self.delays.append((at - datetime.now(UTC)).total_seconds())


def _failing_then(engine: Engine, outcomes: Iterator[bool]) -> None:
    """``engine.reconcile`` fails (Vault unreachable) or runs for real, in turn."""
    real = engine.reconcile

    def reconcile(*args: Any, **kwargs: Any) -> PassResult:
        if next(outcomes):
            return real(*args, **kwargs)
        return PassResult(errors=["Vault: connection refused"])

    engine.reconcile = reconcile  # type: ignore[method-assign]


def test_failures_before_the_first_ready_pass_are_retried_within_the_cap(
    tmp_path: Path,
) -> None:
    path = local_config(tmp_path, rotation={"check_interval": "1h"})
    settings = load_settings(path)
    engine = build_engine(settings)
    # Six failures at start, one pass that works (ready), then six failures again.
    _failing_then(engine, iter([False] * 6 + [True] + [False] * 6))
    scheduler = RecordingScheduler(passes=13)
    run_forever(settings, engine, scheduler=scheduler)
    cap = STARTUP_RETRY_CAP.total_seconds()
    before, after = scheduler.delays[:6], scheduler.delays[6:]
    assert len(before) == 6 and len(after) == 6, scheduler.delays
    assert all(0 < d <= cap for d in before), before
    # Once ready, the usual backoff: 2 s doubling (jittered down by up to a fifth).
    assert max(after) > cap * 3, after
