"""A rejected value is never echoed back: it may be a token pasted into the wrong field,
or a password in a URL. The error names the field and the rule only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.cli import ca_daemon

pytestmark = pytest.mark.usefixtures("clean_env")

SECRET = "hvs.CAESIJ9s3cr3tT0k3nV4lu3"
CLIENT_WITH_SECRET = {"name": "c", "common_name": "c", "dns_names": [f"{SECRET} x"]}


@pytest.mark.parametrize(
    ("config", "field", "rule"),
    [
        (
            {"kong": {"clients": [{"name": SECRET, "common_name": "kong.up"}]}},
            "kong.clients[0].name",
            "is not a DNS label",
        ),
        (
            {
                "kong": {
                    "clients": [{"name": "c", "common_name": "c", "dns_names": [SECRET + " x"]}]
                }
            },
            "kong.clients[0].dns_names[0]",
            "is not a DNS hostname",
        ),
        (
            {"anchor": {"vault": {"address": f"https://ops:{SECRET}@vault.example:8200"}}},
            "anchor.vault.address",
            "must not carry credentials",
        ),
        (
            {"linkerd": {"namespace": SECRET}},
            "linkerd.namespace",
            "is not a DNS label",
        ),
    ],
    ids=["client-name", "dns-name", "vault-address", "namespace"],
)
def test_config_check_names_the_field_and_never_the_value(
    tmp_path: Path, config: dict[str, object], field: str, rule: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"publish": {"kubernetes": {"enabled": False}}, **config}))
    run = ca_daemon("config", "check", str(path), cwd=tmp_path)
    assert run.returncode == 2, run.stdout
    assert f"{field}: {rule}" in run.stderr
    assert SECRET not in run.stderr + run.stdout
