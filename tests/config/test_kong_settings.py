"""kong.ingress_class and kong.clients[].verify_upstream, and the configurations refused
because what they ask for cannot be published safely: exit 2, naming the field and why,
never echoing the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cli import ca_daemon

pytestmark = pytest.mark.usefixtures("clean_env")

SECRET = "hvs.CAESIJ9s3cr3tT0k3nV4lu3"
CLIENT = {"name": "payments", "common_name": "kong.payments.upstream"}


def _check(tmp_path: Path, config: dict[str, Any], *command: str) -> Any:
    path = tmp_path / "config.yaml"
    base = {
        "anchor": {"local": {"dir": str(tmp_path / "data")}},
        "publish": {"kubernetes": {"enabled": False}},
    }
    path.write_text(yaml.safe_dump({**base, **config}))
    return ca_daemon(*(command or ("config", "check")), str(path), cwd=tmp_path)


@pytest.mark.parametrize("delivery", ["kubernetes", "admin-api"])
def test_verify_upstream_without_a_service_is_refused(tmp_path: Path, delivery: str) -> None:
    kong = {
        "delivery": delivery,
        "admin_api": {"url": "http://127.0.0.1:1"},
        "clients": [CLIENT, {**CLIENT, "name": "orders", "verify_upstream": True}],
    }
    run = _check(tmp_path, {"kong": kong})
    assert run.returncode == 2, run.stdout
    assert "kong.clients[1].verify_upstream: needs service" in run.stderr
    # The daemon itself refuses to start on it, before touching anything.
    started = _check(tmp_path, {"kong": kong}, "run", "--once", "--config")
    assert started.returncode == 2
    assert "kong.clients[1].verify_upstream: needs service" in started.stderr
    assert not (tmp_path / "data").exists()


def test_verify_upstream_with_a_service_is_accepted(tmp_path: Path) -> None:
    client = {**CLIENT, "service": "payments/payments-api", "verify_upstream": True}
    run = _check(tmp_path, {"kong": {"clients": [client]}})
    assert run.returncode == 0, run.stderr
    (effective,) = yaml.safe_load(run.stdout)["kong"]["clients"]
    assert effective["verify_upstream"] is True


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"kong": {"clients": [{**CLIENT, "name": "ca-0123abcd"}]}}, "kong.clients[0].secret"),
        (
            {"kong": {"clients": [{**CLIENT, "secret": "kong-upstream-ca-deadbeef"}]}},
            "kong.clients[0].secret",
        ),
        (
            {"bundles": [{"namespace": "pay", "configmap": "kong-upstream-ca-00ff00ff"}]},
            "bundles[0].configmap",
        ),
        (
            {"linkerd": {"trust_roots_configmap": "kong-upstream-ca-12345678"}},
            "linkerd.trust_roots_configmap",
        ),
    ],
    ids=["client-name", "client-secret", "bundle", "linkerd-roots"],
)
def test_names_of_kong_ca_objects_are_reserved(
    tmp_path: Path, config: dict[str, Any], field: str
) -> None:
    run = _check(tmp_path, config)
    assert run.returncode == 2, run.stdout
    assert f"{field}: is reserved: kong-upstream-ca-<8 hex> names the Kong CA objects" in (
        run.stderr
    )


def test_ingress_class_reaches_the_effective_configuration(tmp_path: Path) -> None:
    run = _check(tmp_path, {"kong": {"ingress_class": "kong.internal"}})
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout)["kong"]["ingress_class"] == "kong.internal"
    default = _check(tmp_path, {})
    assert yaml.safe_load(default.stdout)["kong"]["ingress_class"] == "kong"


@pytest.mark.parametrize("value", [f"Kong {SECRET}", f"{SECRET}\n", "", "x" * 254])
def test_ingress_class_is_an_ingress_class_name_never_echoed(tmp_path: Path, value: str) -> None:
    run = _check(tmp_path, {"kong": {"ingress_class": value}})
    assert run.returncode == 2, run.stdout
    assert "kong.ingress_class: is not a valid Kubernetes object name" in run.stderr
    assert SECRET not in run.stderr + run.stdout
