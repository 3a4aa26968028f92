"""Configuration that would pass `config check` and then break `run` is refused at load time.

One row per bad configuration: `ca-daemon config check FILE` exits 2 with a line naming
the field (or the environment variable, or the file) and the rule. No traceback, and no
secret in the message.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_daemon.cli import main
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.errors import ConfigError
from ca_daemon.util.durations import parse_duration

pytestmark = pytest.mark.usefixtures("clean_env")

FILE = "config file"  # the field of a row whose problem is the file itself
SECRET = "s.supersecret"


def _client(**fields: Any) -> dict[str, Any]:
    return {"kong": {"clients": [{"name": "pay", "common_name": "kong.pay", **fields}]}}


# (config, environment, field, rule); config is a mapping written as YAML, or raw bytes.
BAD: dict[str, tuple[dict[str, Any] | bytes, dict[str, str], str, str]] = {
    # Lifetimes and renewal windows.
    "root lifetime 0s": ({"root": {"lifetime": "0s"}}, {}, "root.lifetime", "must be positive"),
    "root rotate_before = lifetime": (
        {"root": {"lifetime": "100h", "rotate_before": "100h"}},
        {},
        "root.rotate_before",
        "shorter than lifetime",
    ),
    "intermediate rotate_before > lifetime": (
        {"kong": {"intermediate": {"lifetime": "10h", "rotate_before": "20h"}}},
        {},
        "kong.intermediate.rotate_before",
        "shorter than lifetime",
    ),
    "client lifetime 0s": (_client(lifetime="0s"), {}, "kong.clients[0].lifetime", "positive"),
    "client rotate_before 0s": (
        _client(rotate_before="0s"),
        {},
        "kong.clients[0].rotate_before",
        "must be positive",
    ),
    "client due at once with jitter": (
        _client(lifetime="10h", rotate_before="9h50m"),
        {},
        "kong.clients[0].rotate_before",
        "rotate_before * (1 + rotation.jitter) = 10h19m30s must be shorter than lifetime 10h",
    ),
    "root due at once with jitter": (
        {"root": {"lifetime": "100h", "rotate_before": "96h"}},
        {},
        "root.rotate_before",
        "must be shorter than lifetime 100h",
    ),
    "issuer due at once with a large jitter": (
        {"rotation": {"jitter": 0.5}, "linkerd": {"issuer": {"rotate_before": "40h"}}},
        {},
        "linkerd.issuer.rotate_before",
        "= 60h must be shorter than lifetime 48h",
    ),
    "overflowing duration": (
        {"root": {"lifetime": "100000000000h"}},
        {},
        "root.lifetime",
        "too long: at most 100 years",
    ),
    # Names X.509 cannot hold.
    "root common name over 64": (
        {"root": {"common_name": "r" * 65}},
        {},
        "root.common_name",
        "1 to 64 characters",
    ),
    "client common name over 64": (
        _client(common_name="c" * 65),
        {},
        "kong.clients[0].common_name",
        "1 to 64 characters",
    ),
    "client common name empty": (
        _client(common_name=""),
        {},
        "kong.clients[0].common_name",
        "1 to 64 characters",
    ),
    "client common name with a newline": (
        _client(common_name="kong\npay"),
        {},
        "kong.clients[0].common_name",
        "control characters",
    ),
    "root common name with a tab": (
        {"root": {"common_name": "root\tca"}},
        {},
        "root.common_name",
        "control characters",
    ),
    "trust domain too long for the Linkerd issuer": (
        {"trust_domain": "t" * 44 + ".local"},  # identity.linkerd.<50> = 67
        {},
        "trust_domain",
        "the Linkerd issuer's common name identity.linkerd.",
    ),
    "linkerd namespace too long for the Linkerd issuer": (
        {"linkerd": {"namespace": "n" * 50}},
        {},
        "trust_domain",
        "would be 73 characters, X.509 allows 64",
    ),
    "trust domain too long for the Kong intermediate": (
        {"trust_domain": "t" * 45 + ".local", "linkerd": {"enabled": False}},
        {},
        "trust_domain",
        "the Kong intermediate's common name kong-upstream.",
    ),
    "trust domain too long for the root": (
        {"trust_domain": "t" * 46 + ".local", "linkerd": {"enabled": False}},
        {},
        "trust_domain",
        "the root's common name root.linkerd.",
    ),
    "trust domain with a trailing newline": (
        {"trust_domain": "cluster.local\n"},
        {},
        "trust_domain",
        "not a valid Kubernetes object name",
    ),
    # SANs.
    "empty DNS name": (_client(dns_names=[""]), {}, "kong.clients[0].dns_names[0]", "hostname"),
    "DNS name with a space": (
        _client(dns_names=["ok.example", "bad name"]),
        {},
        "kong.clients[0].dns_names[1]",
        "not a DNS hostname",
    ),
    "IPv4 address as DNS name": (
        _client(dns_names=["10.0.0.1"]),
        {},
        "kong.clients[0].dns_names[0]",
        "is an IP address",
    ),
    "IPv6 address as DNS name": (
        _client(dns_names=["::1"]),
        {},
        "kong.clients[0].dns_names[0]",
        "is an IP address",
    ),
    "URI without a scheme": (_client(uris=["kong.pay"]), {}, "kong.clients[0].uris[0]", "URI"),
    "URI with only a scheme": (_client(uris=["spiffe:"]), {}, "kong.clients[0].uris[0]", "URI"),
    "URI with a space": (
        _client(uris=["spiffe://cluster.local/a b"]),
        {},
        "kong.clients[0].uris[0]",
        "is not a URI",
    ),
    # Secrets: the rule is named, the value never shown.
    "token with a space": (
        {"anchor": {"vault": {"auth": {"token": f"{SECRET} x"}}}},
        {},
        "anchor.vault.auth.token",
        "printable ASCII without spaces (value not shown)",
    ),
    "token with a newline": (
        {"anchor": {"vault": {"auth": {"token": f"{SECRET}\n"}}}},
        {},
        "anchor.vault.auth.token",
        "value not shown",
    ),
    "empty token": (
        {"anchor": {"vault": {"auth": {"token": ""}}}},
        {},
        "anchor.vault.auth.token",
        "non-empty",
    ),
    # The environment.
    "misspelt section in the environment": (
        {},
        {"CA_DAEMON_ANCHR__BACKEND": "vault"},
        "CA_DAEMON_ANCHR__BACKEND",
        "unknown setting ('anchr' is not a configuration key at the top level",
    ),
    "misspelt nested key in the environment": (
        {},
        {"CA_DAEMON_ANCHOR__VAULT__AUTH__TOKN": SECRET},
        "CA_DAEMON_ANCHOR__VAULT__AUTH__TOKN",
        "'tokn' is not a configuration key in anchor.vault.auth",
    ),
    "key below a plain value in the environment": (
        {},
        {"CA_DAEMON_TRUST_DOMAIN__NAME": "x"},
        "CA_DAEMON_TRUST_DOMAIN__NAME",
        "unknown setting",
    ),
    "malformed JSON list in the environment": (
        {},
        {"CA_DAEMON_KONG__CLIENTS": "[{"},
        "CA_DAEMON_KONG__CLIENTS",
        "kong.clients takes a JSON value, and this is not",
    ),
    "malformed JSON section holding a secret": (
        {},
        {"CA_DAEMON_ANCHOR__VAULT__AUTH": f'{{"token": "{SECRET}"'},
        "CA_DAEMON_ANCHOR__VAULT__AUTH",
        "takes a JSON value",
    ),
    # Files that are not YAML text.
    "random bytes": (
        b"\xff\xfe\x80\x81 binary",
        {},
        FILE,
        "not UTF-8 text (byte 0xff at offset 0)",
    ),
    "UTF-16": ("trust_domain: x\n".encode("utf-16"), {}, FILE, "not UTF-8 text"),
    "UTF-16 without a BOM": ("trust_domain: x\n".encode("utf-16-le"), {}, FILE, "NUL byte"),
    "NUL in the file": (b"trust_domain: x\0\n", {}, FILE, "binary content (NUL byte at offset 15)"),
    "unclosed quote around a secret": (
        f'anchor: {{vault: {{auth: {{token: "{SECRET}}}}}}}\n'.encode(),
        {},
        FILE,
        "not valid YAML: while scanning a quoted scalar; found unexpected end of stream",
    ),
    # Several clusters.
    "two clusters of one name": (
        {"clusters": [{"name": "west"}, {"name": "west", "kubeconfig": "/k"}]},
        {},
        "clusters[1].name",
        "west is given to more than one cluster",
    ),
    "a linked cluster without a kubeconfig": (
        {"clusters": [{"name": "west"}, {"name": "east"}]},
        {},
        "clusters[1].kubeconfig",
        "a linked cluster is reached with a kubeconfig",
    ),
    "a linked cluster in-cluster": (
        {"clusters": [{"name": "west"}, {"name": "east", "in_cluster": True}]},
        {},
        "clusters[1].in_cluster",
        "only the home cluster (clusters[0]) is in-cluster",
    ),
    "a linked cluster's Kong through the Admin API": (
        {
            "clusters": [
                {"name": "west"},
                {
                    "name": "east",
                    "kubeconfig": "/k",
                    "kong": {"delivery": "admin-api", "admin_api": {"url": "http://kong:8001"}},
                },
            ]
        },
        {},
        "clusters[1].kong.delivery",
        "a linked cluster's Kong is served through Kubernetes only",
    ),
    "a linked cluster's Kong without home's": (
        {
            "kong": {"enabled": False},
            "clusters": [{"name": "west"}, {"name": "east", "kubeconfig": "/k", "kong": {}}],
        },
        {},
        "clusters[1].kong.enabled",
        "needs Kong on in the home cluster too",
    ),
    "a linked cluster's client due at once": (
        {
            "clusters": [
                {"name": "west"},
                {
                    "name": "east",
                    "kubeconfig": "/k",
                    "kong": {
                        "clients": [
                            {
                                "name": "pay",
                                "common_name": "kong.pay",
                                "lifetime": "10h",
                                "rotate_before": "9h50m",
                            }
                        ]
                    },
                },
            ]
        },
        {},
        "clusters[1].kong.clients[0].rotate_before",
        "must be shorter than lifetime 10h",
    ),
    "linked clusters without Kubernetes": (
        {
            "publish": {"kubernetes": {"enabled": False}},
            "clusters": [{"name": "west"}, {"name": "east", "kubeconfig": "/k"}],
        },
        {},
        "publish.kubernetes.enabled",
        "linked clusters are published to through Kubernetes",
    ),
    "home out of rotations": (
        {"clusters": [{"name": "west", "in_rotation": False}]},
        {},
        "clusters[0].in_rotation",
        "the home cluster always takes part",
    ),
    "home Linkerd given twice": (
        {"linkerd": {"namespace": "l5d"}, "clusters": [{"name": "west", "linkerd": {}}]},
        {},
        "clusters[0].linkerd",
        "given twice",
    ),
    "a context without a kubeconfig": (
        {"clusters": [{"name": "west", "context": "prod"}]},
        {},
        "clusters[0].context",
        "needs kubeconfig",
    ),
    "a cluster name that is no DNS label": (
        {"clusters": [{"name": "West_1"}]},
        {},
        "clusters[0].name",
        "is not a DNS label",
    ),
    "a linked issuer due at once": (
        {
            "clusters": [
                {"name": "west"},
                {
                    "name": "east",
                    "kubeconfig": "/k",
                    "linkerd": {"issuer": {"lifetime": "10h", "rotate_before": "9h50m"}},
                },
            ]
        },
        {},
        "clusters[1].linkerd.issuer.rotate_before",
        "must be shorter than lifetime 10h",
    ),
    "nested too deeply": (b"[" * 5000, {}, FILE, "nested too deeply"),
    "a number as a section name": (b"1: 2\n", {}, FILE, "1: unknown key"),
}


def _write(tmp_path: Path, config: dict[str, Any] | bytes) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_bytes(config if isinstance(config, bytes) else yaml.safe_dump(config).encode())
    return path


@pytest.mark.parametrize(("config", "env", "field", "rule"), BAD.values(), ids=BAD.keys())
def test_bad_configuration_exits_2_naming_field_and_rule(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config: dict[str, Any] | bytes,
    env: dict[str, str],
    field: str,
    rule: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = _write(tmp_path, config)
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    prefix = f"config file {path}" if field == FILE else field
    lines = [ln.strip().removeprefix("error: ") for ln in err.splitlines()]
    line = next((ln for ln in lines if ln.startswith(f"{prefix}:")), None)
    assert line is not None, err
    assert rule in line, err
    assert "Traceback" not in err
    assert SECRET not in err


@pytest.mark.parametrize(
    "config",
    [
        # What the integration tests use: tiny lifetimes, and lifetimes past the root's.
        {"linkerd": {"issuer": {"lifetime": "8s", "rotate_before": "6s"}}},
        {"linkerd": {"issuer": {"lifetime": "8s", "rotate_before": "2s"}}},
        {
            "root": {"lifetime": "100h", "rotate_before": "10h"},
            "linkerd": {"issuer": {"lifetime": "500h", "rotate_before": "16h"}},
        },
        # Right at the margin, and the longest duration.
        {"rotation": {"jitter": 0.5}, "linkerd": {"issuer": {"rotate_before": "31h59m"}}},
        {"root": {"lifetime": "876600h"}},
        # 64 characters exactly.
        {"root": {"common_name": "r" * 64}, "trust_domain": "t" * 41 + ".local"},
        _client(
            common_name="Kong upstream client (payments)",
            dns_names=["*.pay.example", "kong.kong.svc.cluster.local", "Kong-1"],
            uris=["spiffe://cluster.local/ns/kong/sa/kong", "urn:kong:pay"],
        ),
        {"anchor": {"vault": {"auth": {"token": "hvs.CAESIJ-x_y.z"}}}},
    ],
)
def test_legitimate_configuration_passes(
    make_settings: Callable[..., Settings], config: Any
) -> None:
    make_settings(config)


def test_test_suite_and_config_file_variables_are_not_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CA_DAEMON_REQUIRE_ALL", "1")
    monkeypatch.setenv("CA_DAEMON_TESTENV", str(tmp_path))
    monkeypatch.setenv("CA_DAEMON_CONFIG", str(_write(tmp_path, {"trust_domain": "a.local"})))
    assert load_settings().trust_domain == "a.local"


def test_environment_as_the_daemon_loop_test_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CA_DAEMON_ROTATION__CHECK_INTERVAL", "1s")
    monkeypatch.setenv("CA_DAEMON_LINKERD__ISSUER__LIFETIME", "8s")
    monkeypatch.setenv("CA_DAEMON_LINKERD__ISSUER__ROTATE_BEFORE", "6s")
    monkeypatch.setenv("CA_DAEMON_ROTATION__CLOCK_SKEW", "0s")
    monkeypatch.setenv("CA_DAEMON_KONG__CLIENTS", '[{"name": "a", "common_name": "kong.a"}]')
    settings = load_settings()
    assert settings.linkerd.issuer.lifetime.total_seconds() == 8
    assert [c.name for c in settings.kong.clients] == ["a"]


def test_environment_names_are_matched_without_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ca_daemon_anchr__backend", "vault")
    with pytest.raises(ConfigError, match="ca_daemon_anchr__backend: unknown setting"):
        load_settings()


def test_margin_rule_follows_rotation_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    # 16h stretched by 0.5 is 24h: fine for a 48h issuer, due at once for a 24h one.
    monkeypatch.setenv("CA_DAEMON_ROTATION__JITTER", "0.5")
    monkeypatch.setenv("CA_DAEMON_LINKERD__ISSUER__LIFETIME", "24h")
    with pytest.raises(ConfigError, match=r"linkerd\.issuer\.rotate_before: .* = 24h must be"):
        load_settings()
    monkeypatch.setenv("CA_DAEMON_ROTATION__JITTER", "0.4")
    assert load_settings().linkerd.issuer.lifetime.total_seconds() == 24 * 3600


def test_every_rule_broken_at_once_is_listed(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "root": {"lifetime": "100h", "rotate_before": "99h"},
            "kong": {
                "clients": [
                    {"name": "a", "common_name": "a", "lifetime": "1h", "rotate_before": "59m"},
                    {"name": "b", "common_name": "b"},
                ]
            },
        },
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    lines = str(caught.value).splitlines()
    assert [ln.split(":")[0].strip() for ln in lines[1:]] == [
        "root.rotate_before",
        "kong.clients[0].rotate_before",
    ]


@pytest.mark.parametrize("text", ["100000000000h", "876601h", "9" * 400 + "s"])
def test_durations_are_bounded(text: str) -> None:
    with pytest.raises(ValueError, match="at most 100 years"):
        parse_duration(text)


def test_run_refuses_the_same_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, {"root": {"lifetime": "0s"}})
    assert main(["run", "--once", "--config", str(path)]) == 2
    assert "root.lifetime: must be positive" in capsys.readouterr().err


def test_a_settings_error_left_over_is_still_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The environment checks come first; pydantic-settings' own error is the fallback.
    monkeypatch.setattr("ca_daemon.config.loading._environment_problems", lambda environ: [])
    monkeypatch.setenv("CA_DAEMON_KONG__CLIENTS", "[{")
    with pytest.raises(ConfigError, match=r'field "kong" .*: Expecting property name'):
        load_settings()


def test_rules_across_fields_are_listed_with_the_field_errors(tmp_path: Path) -> None:
    """Unique names and renewal margins are checked only once the fields they read are
    valid; they are still reported in the same run as the field errors, and nothing is
    reported about a default standing in for a field that was wrong."""
    path = _write(
        tmp_path,
        {
            "root": {"lifetime": "10x"},
            "linkerd": {"issuer": {"lifetime": "1h", "rotate_before": "59m"}},
            "kong": {
                "clients": [
                    {"name": "a", "common_name": "a", "lifetime": "bogus", "rotate_before": "800h"},
                    {"name": "a", "common_name": "b"},
                ]
            },
        },
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    fields = [ln.split(":")[0].strip() for ln in str(caught.value).splitlines()[1:]]
    assert fields == [
        "root.lifetime",
        "kong.clients[0].lifetime",
        "kong.clients",  # names must be unique
        "linkerd.issuer.rotate_before",  # the margin rule, judged on the whole settings
    ]


_MANY = 5000
_CLIENT_ROWS = {
    name: row
    for name, row in BAD.items()
    if isinstance(row[0], dict) and row[2].startswith("kong.clients[0]")
}


def _message(tmp_path: Path, config: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(_write(tmp_path, config))
    return str(caught.value)


def test_every_client_rule_holds_among_5000_clients_with_the_same_message(
    tmp_path: Path,
) -> None:
    """Checking 5,000 clients is made cheap (no per-client work repeated across them, a
    C YAML parser) without dropping a rule: each client row of the table, as the last
    of 5,000, is refused with the message it gets alone, but for its index."""
    assert len(_CLIENT_ROWS) > 10
    good = [{"name": f"c{i:04d}", "common_name": f"kong.c{i:04d}"} for i in range(_MANY - 1)]
    for name, (config, _env, _field, _rule) in _CLIENT_ROWS.items():
        alone = _message(tmp_path, config)
        (bad,) = config["kong"]["clients"]
        among = _message(tmp_path, {"kong": {"clients": [*good, bad]}})
        assert among == alone.replace("kong.clients[0]", f"kong.clients[{_MANY - 1}]"), name


def test_repeated_names_and_shared_services_among_5000_clients_are_named(tmp_path: Path) -> None:
    clients: list[dict[str, Any]] = [
        {"name": f"c{i:04d}", "common_name": f"kong.c{i:04d}"} for i in range(_MANY)
    ]
    clients[4321]["name"] = clients[17]["name"] = "twice"
    clients[4999]["name"] = clients[0]["name"]
    message = _message(tmp_path, {"kong": {"clients": clients}})
    assert "client names must be unique; repeated: c0000, twice" in message
    for client in clients:
        client["name"] = f"x{id(client)}"
    clients[3]["service"] = clients[4000]["service"] = "shop/api"
    message = _message(tmp_path, {"kong": {"clients": clients}})
    assert "each service takes one client; shared: shop/api" in message
