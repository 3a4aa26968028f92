"""The certificate series follow the state: a new certificate moves them, a role change
moves the label, a credential gone takes its series along; unchanged ones stay as they
are (made anew at every pass, 15,000 series at 5,000 clients, they were most of an idle
daemon's CPU)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from ca_daemon.config.settings import Settings
from ca_daemon.model.state import RootRole
from ca_daemon.publish.base import PublishReport
from ca_daemon.rotation.results import PassResult
from ca_daemon.service.metrics import Metrics
from tests.support.clock import NOW
from tests.support.pki import issued_entry
from tests.support.states import steady_state

pytestmark = pytest.mark.usefixtures("clean_env")

NOT_AFTER = "ca_daemon_certificate_not_after_timestamp_seconds"
NEXT = "ca_daemon_next_rotation_timestamp_seconds"


def _series(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    found = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_series_follow_the_state(make_settings: Callable[..., Settings]) -> None:
    clients = [{"name": n, "common_name": f"kong.{n}"} for n in ("payments", "orders")]
    settings = make_settings({"kong": {"clients": clients}})
    state = steady_state(settings)
    metrics = Metrics()
    metrics.observe_state(state, settings, NOW)
    first = _series(metrics, NOT_AFTER)
    kinds = sorted(dict(k)["kind"] for k in first)
    assert kinds == sorted(
        ["trust-anchor", "linkerd-issuer", "kong-intermediate", "kong-client", "kong-client"]
    )
    touched: list[tuple[str, ...]] = []
    for gauge in (metrics.not_after, metrics.not_before, metrics.next_rotation):
        real = gauge.labels
        gauge.labels = lambda *a, _r=real, **k: touched.append(a) or _r(*a, **k)  # type: ignore[method-assign]
    metrics.observe_state(state, settings, NOW)
    assert _series(metrics, NOT_AFTER) == first
    assert touched == []  # nothing changed: no series touched
    # Renewed: the value moves, under the same labels.
    renewed = issued_entry("payments")
    state = replace(state, kong_clients={**state.kong_clients, "payments": renewed})
    metrics.observe_state(state, settings, NOW)
    payments = (("kind", "kong-client"), ("name", "payments"), ("state", "active"))
    assert _series(metrics, NOT_AFTER)[payments] == renewed.cert.not_valid_after_utc.timestamp()
    # Removed: its series go.
    state = replace(state, kong_clients={"payments": renewed})
    metrics.observe_state(state, settings, NOW)
    assert not any(dict(k).get("name") == "orders" for k in _series(metrics, NOT_AFTER))
    assert not any(dict(k).get("name") == "orders" for k in _series(metrics, NEXT))
    # The root retiring: the label moves, no series left under the old one.
    (root,) = state.ca.roots
    state = replace(state, ca=replace(state.ca, roots=(replace(root, role=RootRole.RETIRING),)))
    metrics.observe_state(state, settings, NOW)
    roots = {dict(k)["state"] for k in _series(metrics, NOT_AFTER) if "trust-anchor" in str(k)}
    assert roots == {"retiring"}


def test_a_standby_forgets_what_it_said_of_each_cluster_as_leader(
    make_settings: Callable[..., Settings],
) -> None:
    linked = [{"name": "west"}, {"name": "east", "kubeconfig": "/k"}]
    settings = make_settings({"publish": {"kubernetes": {"enabled": True}}, "clusters": linked})
    down = PublishReport("kubernetes/east", errors={"*": "unreachable"}, cluster="east", holds=True)
    metrics = Metrics()
    metrics.observe(PassResult(reports=[down], pending_pods=("east/shop/web-1",)), settings, NOW)
    holds = "ca_daemon_cluster_holds_root_rotation"
    assert _series(metrics, holds) == {(("cluster", "east"),): 1.0}
    assert _series(metrics, "ca_daemon_cluster_pending_pods")[(("cluster", "east"),)] == 1.0
    metrics.forget_clusters()  # as the service does once it is a standby
    assert _series(metrics, holds) == {}
    assert _series(metrics, "ca_daemon_cluster_pending_pods") == {}
