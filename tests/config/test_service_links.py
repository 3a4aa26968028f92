"""The kubelet's service-link variables of a Service named ``ca-daemon`` (or
``ca-daemon-*``) are not settings: the daemon starts with them in its environment, and a
misspelt setting beside them is still refused, named."""

from __future__ import annotations

import pytest

from ca_daemon.cli import main
from ca_daemon.config.loading import load_settings
from ca_daemon.config.service_links import is_service_link
from ca_daemon.errors import ConfigError

pytestmark = pytest.mark.usefixtures("clean_env")


def kubelet_links(
    service: str, cluster_ip: str, ports: list[tuple[str, int, str]]
) -> dict[str, str]:
    """What the kubelet writes for a Service (pkg/kubelet/envvars FromServices):
    ``ports`` as (name, port, protocol), the first one's name may be empty."""
    prefix = service.upper().replace("-", "_")
    host = f"[{cluster_ip}]" if ":" in cluster_ip else cluster_ip
    env = {f"{prefix}_SERVICE_HOST": cluster_ip, f"{prefix}_SERVICE_PORT": str(ports[0][1])}
    for name, port, _ in ports:
        if name:
            env[f"{prefix}_SERVICE_PORT_{name.upper().replace('-', '_')}"] = str(port)
    for i, (_, port, protocol) in enumerate(ports):
        url = f"{protocol.lower()}://{host}:{port}"
        if i == 0:
            env[f"{prefix}_PORT"] = url
        at = f"{prefix}_PORT_{port}_{protocol.upper()}"
        env |= {
            at: url,
            f"{at}_PROTO": protocol.lower(),
            f"{at}_PORT": str(port),
            f"{at}_ADDR": cluster_ip,
        }
    return env


CHART_SERVICE = kubelet_links("ca-daemon", "10.96.12.34", [("http", 8080, "TCP")])


def test_the_chart_services_links_are_the_eight_the_report_named() -> None:
    assert sorted(CHART_SERVICE) == sorted(
        [
            "CA_DAEMON_SERVICE_HOST",
            "CA_DAEMON_SERVICE_PORT",
            "CA_DAEMON_SERVICE_PORT_HTTP",
            "CA_DAEMON_PORT",
            "CA_DAEMON_PORT_8080_TCP",
            "CA_DAEMON_PORT_8080_TCP_PROTO",
            "CA_DAEMON_PORT_8080_TCP_PORT",
            "CA_DAEMON_PORT_8080_TCP_ADDR",
        ]
    )


@pytest.mark.parametrize(
    "links",
    [
        CHART_SERVICE,
        kubelet_links("ca-daemon-metrics", "10.0.0.7", [("", 9090, "TCP")]),
        kubelet_links(
            "ca-daemon-extra", "fd00:10:96::1", [("dns-udp", 53, "UDP"), ("sig", 3868, "SCTP")]
        ),
    ],
    ids=["ca-daemon", "ca-daemon-metrics (unnamed port)", "IPv6, UDP and SCTP"],
)
def test_service_links_are_not_settings(
    links: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in links.items():
        assert is_service_link(name, value), (name, value)
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CA_DAEMON_TRUST_DOMAIN", "links.local")  # real settings still read
    assert load_settings().trust_domain == "links.local"


def test_the_daemon_starts_beside_the_charts_service(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The failure as a Pod met it: `config check` (as `run`) exited 2 on CA_DAEMON_PORT."""
    for name, value in CHART_SERVICE.items():
        monkeypatch.setenv(name, value)
    assert main(["config", "check"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CA_DAEMON_PORT", "8080"),  # a port meant as a setting, not a link URL
        ("CA_DAEMON_SERVICE_HOST", "vault.example.com"),  # a name, not an IP
        ("CA_DAEMON_SERVICE_PORT", "http"),
        ("CA_DAEMON_SERVICE_PORT", "0"),
        ("CA_DAEMON_SERVICE_PORT", "65536"),
        ("CA_DAEMON_SERVICE_PORT_HTTP", "08080"),
        ("CA_DAEMON_PORT", "http://10.0.0.1:8080"),  # no such link protocol
        ("CA_DAEMON_PORT", "tcp://10.0.0.1"),
        ("CA_DAEMON_PORT", "tcp://fd00::1:8080"),  # IPv6 unbracketed
        ("CA_DAEMON_PORT_8080_TCP", "tcp://10.0.0.1:9090"),  # the port disagrees
        ("CA_DAEMON_PORT_8080_TCP", "udp://10.0.0.1:8080"),  # the protocol disagrees
        ("CA_DAEMON_PORT_8080_TCP_PROTO", "udp"),
        ("CA_DAEMON_PORT_8080_TCP_PORT", "9090"),
        ("CA_DAEMON_PORT_8080_TCP_ADDR", "localhost"),
        ("CA_DAEMON_PORT_8080_HTTP", "tcp://10.0.0.1:8080"),  # no such protocol
        ("ca_daemon_port", "tcp://10.0.0.1:8080"),  # the kubelet writes upper case
        ("CA_DAEMON_SERVER_ADDRESS", "10.0.0.1"),  # a misspelt server.address
    ],
)
def test_a_misspelt_setting_is_still_refused_and_named(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not is_service_link(name, value)
    for link, link_value in CHART_SERVICE.items():
        monkeypatch.setenv(link, link_value)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"{name}: unknown setting"):
        load_settings()


def test_a_link_under_a_section_prefix_is_not_read_as_a_nested_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Service named ``ca-daemon-server--x`` (``--`` is allowed in a Service name) writes
    ``CA_DAEMON_SERVER__X_...``: the environment layer must not hand it to ``server``."""
    for name, value in kubelet_links("ca-daemon-server--x", "10.0.0.9", [("", 80, "TCP")]).items():
        monkeypatch.setenv(name, value)
    assert load_settings().server.address == "127.0.0.1:8080"
