"""Linkerd's verdict on an issuer certificate, key and trust bundle (tests/linkerd-check)."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path
from typing import Protocol

import pytest

from tests.support.servers.tools import require_tool


class LinkerdCheck(Protocol):
    def __call__(
        self, bundle: Path, issuer_crt: Path, issuer_key: Path, now: datetime | None = None
    ) -> tuple[int, str]: ...


@pytest.fixture(scope="session")
def linkerd_check() -> LinkerdCheck:
    """`linkerd_check(bundle_pem, issuer_crt, issuer_key, now=None) -> (returncode, output)`.

    ``now`` checks as of that moment instead of the wall clock, for tests that run the
    daemon on a simulated clock.

    returncode 0: Linkerd's install/upgrade checks, its identity controller and its issuance
    path all accept the files (output lists each "ok: ..."). returncode 1: output holds
    "FAIL <stage>: <Linkerd's error text>". See tests/linkerd-check/main.go.
    """
    binary = require_tool("linkerd-check")

    def check(
        bundle: Path, issuer_crt: Path, issuer_key: Path, now: datetime | None = None
    ) -> tuple[int, str]:
        at = [f"--now={now.strftime('%Y-%m-%dT%H:%M:%SZ')}"] if now else []
        result = subprocess.run(
            [
                binary,
                f"--bundle={bundle}",
                f"--issuer-crt={issuer_crt}",
                f"--issuer-key={issuer_key}",
                *at,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.returncode, result.stdout + result.stderr

    return check
