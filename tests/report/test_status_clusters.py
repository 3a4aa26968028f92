"""`ca-daemon status` with several clusters: one line per cluster, from the leader's last
publish, saying what holds a root rotation and where."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ca_daemon.config.settings import Settings
from ca_daemon.publish.base import PublishReport
from ca_daemon.report.status import clusters_view, render_table, status_view
from tests.support.clock import NOW
from tests.support.states import steady_state

pytestmark = pytest.mark.usefixtures("clean_env")


def test_each_cluster_is_one_line_naming_what_holds_the_rotation(
    make_settings: Callable[..., Settings],
) -> None:
    linked = [
        {"name": "west"},
        {"name": "east", "kubeconfig": "/k"},
        {"name": "lab", "kubeconfig": "/l", "in_rotation": False},
    ]
    settings = make_settings({"publish": {"kubernetes": {"enabled": True}}, "clusters": linked})
    state = steady_state(settings)
    down = "read ConfigMap linkerd/linkerd-identity-trust-roots: API server unreachable (X)"
    reports = [
        PublishReport("kubernetes"),
        PublishReport(
            "kubernetes/east", errors={"*": down}, cluster="east", holds=True, reached_at=NOW
        ),
        PublishReport("kubernetes/lab", cluster="lab", reached_at=NOW),
    ]
    pending = ["shop/web-1", "east/shop/web-2", "east/shop/web-3"]
    views = clusters_view(settings, reports, pending, state, NOW)
    assert views is not None
    by_name = {v["name"]: v for v in views}
    assert by_name["west"]["home"] and by_name["west"]["pending_pods"] == ["shop/web-1"]
    assert by_name["east"]["reached"] is False and by_name["east"]["holds_rotation"] is True
    assert by_name["east"]["pending_pods"] == ["shop/web-2", "shop/web-3"]
    assert by_name["lab"]["in_rotation"] is False and by_name["lab"]["reached"] is True
    view = status_view(state, settings, NOW)
    view["clusters"] = views
    lines = render_table(view).splitlines()
    east = next(line for line in lines if line.startswith("cluster east"))
    assert "NOT reached (last contact: 2026-" in east and "holds the root rotation" in east
    assert "2 lagging pod(s)" in east and "API server unreachable" in east
    lab = next(line for line in lines if line.startswith("cluster lab"))
    assert "OUT of root rotations" in lab
    # One cluster: nothing to tell apart.
    assert clusters_view(make_settings(), reports, pending) is None
