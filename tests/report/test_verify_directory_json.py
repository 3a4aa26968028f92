"""`ca-daemon verify --json` on the published directory: the same document as for a
cluster, with the directory as its target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli import ca_daemon

pytestmark = pytest.mark.integration


def test_verify_json_on_a_directory(tmp_path: Path) -> None:
    assert ca_daemon("run", "--once", cwd=tmp_path).returncode == 0
    ok = ca_daemon("verify", "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    doc = json.loads(ok.stdout)
    assert (doc["ok"], doc["findings"], doc["target"]) == (True, [], "ca-daemon-data/out")

    key = tmp_path / "ca-daemon-data/out/kong/clients/example/tls.key"
    key.chmod(0o644)
    bad = ca_daemon("verify", "--json", cwd=tmp_path)
    assert bad.returncode == 1
    (found,) = json.loads(bad.stdout)["findings"]
    assert (found["id"], found["object"]) == (
        "secret-mode",
        "ca-daemon-data/out/kong/clients/example/tls.key",
    )
    assert "PRIVATE KEY" not in bad.stdout

    text = ca_daemon("verify", cwd=tmp_path)
    assert f"PROBLEM {found['message']} [secret-mode] fix: {found['action']}" in text.stdout
