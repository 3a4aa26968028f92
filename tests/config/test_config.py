"""Configuration: layers and precedence, derived defaults, and errors that name the field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from ca_daemon.cli import main
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.errors import ConfigError

pytestmark = pytest.mark.usefixtures("clean_env")


def test_embedded_default_is_a_local_laptop_setup() -> None:
    settings = load_settings()
    assert settings.anchor.backend == "local"
    assert settings.kubernetes_enabled is False
    assert settings.publish_directory == Path("ca-daemon-data/out")
    assert settings.api_token_file == Path("ca-daemon-data/api-token")
    assert settings.root_common_name == "root.linkerd.cluster.local"
    assert settings.linkerd_issuer_common_name == "identity.linkerd.cluster.local"
    assert [c.name for c in settings.kong.clients] == ["example"]


def test_precedence_flags_over_env_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "trust_domain": "from-file.local",
                "anchor": {"backend": "vault", "vault": {"address": "http://file:8200"}},
                "rotation": {"check_interval": "30s"},
            }
        )
    )
    monkeypatch.setenv("CA_DAEMON_ANCHOR__VAULT__ADDRESS", "http://env:8200")
    monkeypatch.setenv("CA_DAEMON_TRUST_DOMAIN", "from-env.local")
    settings = load_settings(path, {"trust_domain": "from-flag.local"})
    assert settings.trust_domain == "from-flag.local"
    assert settings.anchor.vault.address == "http://env:8200"
    # Nested env keys merge with the file's section instead of replacing it.
    assert settings.anchor.backend == "vault"
    assert settings.rotation.check_interval.total_seconds() == 30
    assert settings.root_common_name == "root.linkerd.from-flag.local"


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("trust_domain: env-file.local\n")
    monkeypatch.setenv("CA_DAEMON_CONFIG", str(path))
    settings = load_settings()
    assert settings.trust_domain == "env-file.local"
    assert settings.kong.clients == []  # a given file replaces the embedded default entirely


@pytest.mark.parametrize(
    ("config", "field", "reason"),
    [
        ({"anchr": {}}, "anchr", "unknown key"),
        ({"anchor": {"vault": {"adress": "x"}}}, "anchor.vault.adress", "unknown key"),
        ({"anchor": {"backend": "etcd"}}, "anchor.backend", "'local' or 'vault'"),
        ({"root": {"lifetime": "forever"}}, "root.lifetime", "invalid duration"),
        ({"root": {"lifetime": 48}}, "root.lifetime", "needs a unit"),
        ({"root": {"key": "dsa"}}, "root.key", "ec-p256"),
        (
            {"linkerd": {"issuer": {"lifetime": "24h", "rotate_before": "48h"}}},
            "linkerd.issuer.rotate_before",
            "shorter than lifetime",
        ),
        (
            {"kong": {"clients": [{"name": "../etc", "common_name": "x"}]}},
            "kong.clients[0].name",
            "DNS label",
        ),
        (
            {"kong": {"clients": [{"name": "a", "common_name": "x", "service": "a/b/c"}]}},
            "kong.clients[0].service",
            "namespace/name",
        ),
        (
            {"kong": {"clients": [{"name": "a", "common_name": "x"}] * 2}},
            "kong.clients",
            "repeated: a",
        ),
        (
            {
                "kong": {
                    "clients": [
                        {"name": "a", "common_name": "x", "service": "ns/api"},
                        {"name": "b", "common_name": "y", "service": "ns/api"},
                    ]
                }
            },
            "kong.clients",
            "shared: ns/api",
        ),
        ({"kong": {"delivery": "admin-api"}}, "kong", "admin_api.url"),
        ({"server": {"address": "localhost"}}, "server.address", "host:port"),
        ({"anchor": {"vault": {"address": "vault:8200"}}}, "anchor.vault.address", "http"),
        ({"rotation": {"jitter": 2}}, "rotation.jitter", "less than or equal"),
        (
            {"anchor": {"vault": {"auth": {"method": "kubernetes"}}}},
            "anchor.vault.auth",
            "needs 'role'",
        ),
    ],
)
def test_bad_configuration_exits_2_naming_the_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    config: dict[str, object],
    field: str,
    reason: str,
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    line = next((ln for ln in err.splitlines() if ln.strip().startswith(f"{field}:")), None)
    assert line is not None, err
    assert reason in line


def test_bad_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CA_DAEMON_ROTATION__CHECK_INTERVAL", "soon")
    with pytest.raises(ConfigError, match=r"rotation\.check_interval: invalid duration"):
        load_settings()


@pytest.mark.parametrize("text", ["[1, 2]", "a: [unclosed"])
def test_unusable_yaml_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        load_settings(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    assert main(["config", "check", str(tmp_path / "nope.yaml")]) == 2


def test_config_check_prints_effective_config_with_secrets_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "anchor": {
                    "backend": "vault",
                    "vault": {"auth": {"method": "token", "token": "s.supersecret"}},
                },
                "kong": {"clients": [{"name": "pay", "common_name": "kong.pay"}]},
            }
        )
    )
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "s.supersecret" not in out
    effective = yaml.safe_load(out)
    assert effective["anchor"]["vault"]["auth"]["token"] == "**********"
    assert effective["kong"]["clients"][0]["secret"] == "kong-upstream-pay"
    assert effective["linkerd"]["issuer"] == {"lifetime": "48h", "rotate_before": "16h"}
    assert effective["root"]["common_name"] == "root.linkerd.cluster.local"


def test_settings_fixture_shape(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(trust_domain="example.org")
    assert settings.trust_domain == "example.org"
    assert settings.kong.clients[0].secret_name == "kong-upstream-payments"
