"""`make demo` (scripts/demo): a whole root rotation in about a minute, the published
chains verified throughout, and nothing left behind."""

from __future__ import annotations

import glob
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.cli import daemon_env

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo"


def test_the_demo_rotates_the_root_and_verifies_every_step(tmp_path: Path) -> None:
    before = set(glob.glob(f"{tempfile.gettempdir()}/ca-daemon-demo.*"))
    run = subprocess.run(
        [str(DEMO)], env=daemon_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "trust-anchor: running; phase propagating" in out
    assert "trust-anchor: succeeded; rotated to root-3" in out
    checks = int(out.split("== verify during the rotation: ")[1].split()[0])
    assert checks >= 5 and "all passed" in out
    assert out.count(": OK") == 2  # verify before and after
    assert set(glob.glob(f"{tempfile.gettempdir()}/ca-daemon-demo.*")) == before
