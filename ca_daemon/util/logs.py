"""Logging: one JSON object per line when not on a terminal, readable lines on one.

A log collector wants structured events; a person at a terminal wants sentences.
A record may carry ``fields`` (``extra={"fields": {...}}``), which become top-level
keys of its JSON line (the audit log does this). The scheduler's per-tick INFO lines
are silenced: they would bury what matters.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import IO, Any

_READABLE = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            event.update({k: v for k, v in fields.items() if k not in event})
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def configure(stream: IO[str] | None = None, json_lines: bool | None = None) -> None:
    """Set up the root logger; ``json_lines`` None: JSON unless ``stream`` is a terminal."""
    stream = stream or sys.stderr
    if json_lines is None:
        json_lines = not stream.isatty()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(_READABLE))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # httpx and httpcore say every request at INFO: the CLI's --wait polls each second.
    for noisy in ("apscheduler", "uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RateLimitedLog:
    """A warning said at most once per ``period`` seconds, with how often it was held
    back: a flood (of connections, of refusals) must not fill the disk with log lines."""

    def __init__(self, logger: logging.Logger, period: float) -> None:
        self._logger = logger
        self._period = period
        self._last: float | None = None
        self._held = 0
        self._lock = threading.Lock()

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < self._period:
                self._held += 1
                return
            held, self._held, self._last = self._held, 0, now
        suffix = f" ({held} more like this since the last such line)" if held else ""
        self._logger.warning(message + suffix, *args)
