"""scripts/vault-setup.sh, run as an administrator against a fresh OpenBao, leaves exactly
what the daemon needs: it then runs on a token holding only the shipped policy, with
`create_if_missing: false`, and the script can be run again."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.cli import ca_daemon
from tests.support.servers.openbao import own_openbao

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vault-setup.sh"


def test_the_setup_script_prepares_vault_for_the_daemon(tmp_path: Path) -> None:
    with own_openbao(tmp_path, "bao (setup script)") as bao:
        env = {
            **os.environ,
            "VAULT_CLI": bao.bao,
            "VAULT_ADDR": bao.address,
            "VAULT_TOKEN": bao.token,
            "BAO_ADDR": bao.address,
            "BAO_TOKEN": bao.token,
            "HOME": str(tmp_path),
        }
        for attempt in (1, 2):  # idempotent: an administrator may run it again
            run = subprocess.run(
                ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120
            )
            assert run.returncode == 0, f"run {attempt}: {run.stdout}{run.stderr}"
        role = bao.cli("read", "-format=json", "auth/kubernetes/role/ca-daemon").stdout
        assert '"ca-daemon"' in role and '"vault"' in role  # bound SA and audience
        token = bao.cli(
            "token", "create", "-policy=ca-daemon", "-no-default-policy", "-field=token"
        ).stdout.strip()
        token_file = tmp_path / "vault-token"
        token_file.write_text(token + "\n")
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "anchor": {
                        "backend": "vault",
                        "local": {"dir": str(tmp_path / "data")},
                        "vault": {
                            "address": bao.address,
                            "create_if_missing": False,
                            "auth": {"method": "token", "token_file": str(token_file)},
                        },
                    },
                    "publish": {"kubernetes": {"enabled": False}},
                    "kong": {"clients": [{"name": "pay", "common_name": "kong.pay.upstream"}]},
                }
            )
        )
        first = ca_daemon("run", "--once", "--config", str(config), cwd=tmp_path)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "IssueKongClient kong-client pay (missing): ok" in first.stdout
        verified = ca_daemon("verify", "--config", str(config), cwd=tmp_path)
        assert verified.returncode == 0, verified.stdout
