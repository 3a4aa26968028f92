"""Smoke tests proving each fixture runs the real server, not a stand-in."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.openbao import OpenBao

pytestmark = pytest.mark.integration


def test_openbao_is_real_dev_server(openbao: OpenBao, unique_name: str) -> None:
    version = openbao.cli("version").stdout
    assert version.startswith("OpenBao v2."), version

    with openbao.http() as http:
        health = http.get("/v1/sys/health").json()
    assert health["initialized"] is True
    assert health["sealed"] is False

    # The token really is root: it can mount an engine at a per-test path and see it listed.
    openbao.cli("secrets", "enable", f"-path={unique_name}", "kv")
    mounts = json.loads(openbao.cli("secrets", "list", "-format=json").stdout)
    assert f"{unique_name}/" in mounts
    assert "pki/" not in mounts  # the fixture leaves PKI to the daemon under test
