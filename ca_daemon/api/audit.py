"""The audit log: one JSON line per accepted or refused API call, never a token.

Written to the logger ``ca_daemon.audit`` (so it goes wherever the daemon's logs go)
and, when ``path`` is given, appended to that file (0600) as well.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

# The name operators filter on; kept when the module moved to api/.
log = logging.getLogger("ca_daemon.audit")


@dataclass(frozen=True)
class AuditRecord:
    caller: str
    source: str
    method: str
    path: str
    status: int
    result: str
    target: str | None = None
    reason: str | None = None
    operation: str | None = None
    emergency: bool = False  # an emergency rotation was asked for (its own permission)


class AuditLog:
    """``reads``: also log accepted reads (GET); writes and refusals are always logged."""

    def __init__(self, path: Path | None = None, reads: bool = True) -> None:
        self.path = path
        self.reads = reads
        self._lock = threading.Lock()

    def write(self, record: AuditRecord) -> str:
        fields = {"audit": True, **asdict(record)}
        line = json.dumps(
            {"time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), **fields},
            sort_keys=True,
        )
        read = record.method in ("GET", "HEAD") and record.status < 400
        if self.reads or not read:
            # As JSON logs the fields are the line's keys, once; the message is a sentence.
            log.info(_sentence(record), extra={"fields": fields})
        if self.path is not None:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a") as handle:
                    handle.write(line + "\n")
        return line


def _sentence(record: AuditRecord) -> str:
    said = f"{record.method} {record.path} {record.status} by {record.caller} from {record.source}"
    if record.emergency:
        said = f"EMERGENCY {said}"
    details = [
        f"{k} {v}" for k, v in (("target", record.target), ("operation", record.operation)) if v
    ]
    return f"{said}: {record.result}" + (f" ({', '.join(details)})" if details else "")
