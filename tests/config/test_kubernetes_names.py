"""Names and keys Kubernetes would refuse are refused when the configuration is loaded,
naming the field (the same rules are checked against a real apiserver in
tests/system/test_edge_inputs.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ca_daemon.config.settings import Settings
from ca_daemon.errors import ConfigError

pytestmark = pytest.mark.usefixtures("clean_env")


def _client(**fields: Any) -> dict[str, Any]:
    return {"kong": {"clients": [{"name": "pay", "common_name": "kong.pay", **fields}]}}


def _bundle(**fields: Any) -> dict[str, Any]:
    return {"bundles": [{"namespace": "up", "configmap": "trust", **fields}]}


REFUSED = {
    "secret with an empty label": (_client(secret="a..b"), "kong.clients[0].secret"),
    "secret with a label ending in '-'": (_client(secret="a-.b"), "kong.clients[0].secret"),
    "secret over 253": (_client(secret="a" * 254), "kong.clients[0].secret"),
    "configmap with '_'": (_bundle(configmap="up_trust"), "bundles[0].configmap"),
    "issuer secret upper case": ({"linkerd": {"issuer_secret": "Issuer"}}, "linkerd.issuer_secret"),
    "namespace over 63": (_bundle(namespace="n" * 64), "bundles[0].namespace"),
    "namespace with a dot": (_bundle(namespace="a.b"), "bundles[0].namespace"),
    "service starting with a digit": (_client(service="pay/1api"), "kong.clients[0].service"),
    "service over 63": (_client(service="pay/" + "s" * 64), "kong.clients[0].service"),
    "service with three parts": (_client(service="a/b/c"), "kong.clients[0].service"),
    "key '.'": (_bundle(key="."), "bundles[0].key"),
    "key starting with '..'": (_bundle(key="..data"), "bundles[0].key"),
    "key with '/'": (_bundle(key="a/b"), "bundles[0].key"),
    "key over 253": (_bundle(key="k" * 254), "bundles[0].key"),
    "client name with a dot": (
        {"kong": {"clients": [{"name": "a.b", "common_name": "x"}]}},
        "kong.clients[0].name",
    ),
}


@pytest.mark.parametrize(("config", "field"), REFUSED.values(), ids=REFUSED.keys())
def test_a_name_kubernetes_would_refuse_is_refused_naming_the_field(
    make_settings: Callable[..., Settings], config: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        make_settings(config)
    assert f"  {field}: " in str(refused.value)


ACCEPTED = {
    "dotted secret": _client(secret="kong.upstream.pay"),
    "secret of 253": _client(secret="a" * 253),
    "namespace of 63": _bundle(namespace="n" * 63),
    "service of 63": _client(service="pay/" + "s" * 63),
    "namespace starting with a digit": _client(service="1pay/api"),
    "key with '_' and capitals": _bundle(key="CA_bundle.PEM"),
    "key of 253": _bundle(key="k" * 253),
    "admin-api service id": {
        "kong": {
            "delivery": "admin-api",
            "admin_api": {"url": "http://127.0.0.1:8001"},
            "clients": [{"name": "pay", "common_name": "x", "service": "4f1e-api"}],
        }
    },
}


@pytest.mark.parametrize("config", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_a_name_kubernetes_takes_is_accepted(
    make_settings: Callable[..., Settings], config: dict[str, Any]
) -> None:
    make_settings(config)
