"""Log lines: JSON objects off a terminal, readable on one, audit fields as keys."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ca_daemon.api.audit import AuditLog, AuditRecord
from ca_daemon.util import logs

pytestmark = pytest.mark.usefixtures("clean_env")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_off_a_terminal_with_audit_fields_as_keys() -> None:
    out = io.StringIO()
    logs.configure(out)
    logging.getLogger("ca_daemon.engine").info("renewed %s", "payments")
    logging.getLogger("apscheduler.executors.default").info("Running job ...")  # silenced
    AuditLog().write(AuditRecord("alice", "10.0.0.1", "POST", "/v1/rotate", 202, "accepted"))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["message"] == "renewed payments"
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "ca_daemon.engine"
    assert len(lines) == 2
    audit = lines[1]
    assert audit["logger"] == "ca_daemon.audit" and audit["audit"] is True
    assert (audit["caller"], audit["status"], audit["path"]) == ("alice", 202, "/v1/rotate")


def test_readable_lines_on_a_terminal() -> None:
    out = _Tty()
    logs.configure(out)
    logging.getLogger("ca_daemon.engine").warning("drift in %s", "kubernetes")
    line = out.getvalue().strip()
    assert line.endswith("WARNING ca_daemon.engine: drift in kubernetes")
    with pytest.raises(ValueError):
        json.loads(line)
