"""`config rbac` grants what linkerd.restart and linkerd.gate need, and nothing more."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_daemon.cli import main
from ca_daemon.config.settings import Settings
from ca_daemon.report.rbac import manifests

pytestmark = pytest.mark.usefixtures("clean_env")


def _docs(settings: Settings, kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests(settings, "cad", "ca-daemon") if d["kind"] == kind]


def _grants(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    return {
        verb
        for rule in rules
        if group in rule["apiGroups"] and resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _linkerd_role(settings: Settings) -> list[dict[str, Any]]:
    (role,) = [d for d in _docs(settings, "Role") if d["metadata"]["namespace"] == "linkerd"]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def _cluster_rules(settings: Settings) -> list[dict[str, Any]]:
    roles = _docs(settings, "ClusterRole")
    return [rule for role in roles for rule in role["rules"]]


Make = Callable[..., Settings]


PODS_LIST = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


def test_gate_time_restart_none_needs_only_to_list_pods_cluster_wide(make_settings: Make) -> None:
    """Listing Pods stays: an emergency root rotation waits on them whatever gate says."""
    linkerd = {
        "gate": "time",
        "restart": "none",
        "confirm": "none",
        "emergency_restart": "as-restart",
    }
    s = make_settings({"linkerd": linkerd})
    assert _cluster_rules(s) == PODS_LIST
    rules = _linkerd_role(s)
    assert _grants(rules, "apps", "deployments") == set()
    assert _grants(rules, "", "events") == {"create", "get", "patch"}  # its one pending Event


def test_an_emergency_rolls_every_meshed_workload_only_when_told_to(make_settings: Make) -> None:
    default = make_settings({"linkerd": {"restart": "none"}})
    assert default.linkerd.emergency_restart == "as-restart"
    assert _cluster_rules(default) == PODS_LIST
    assert _grants(_linkerd_role(default), "apps", "deployments") == set()
    rolls = make_settings({"linkerd": {"restart": "none", "emergency_restart": "all"}})
    rules = _cluster_rules(rolls)
    for workload in ("deployments", "statefulsets", "daemonsets"):
        assert _grants(rules, "apps", workload) == {"get", "patch"}
    assert _grants(_linkerd_role(rolls), "apps", "deployments") == {"list", "patch"}


def test_gate_pods_lists_pods_cluster_wide_and_updates_its_one_event(make_settings: Make) -> None:
    linkerd = {
        "gate": "pods",
        "restart": "none",
        "confirm": "none",
        "emergency_restart": "as-restart",
    }
    s = make_settings({"linkerd": linkerd})
    assert _cluster_rules(s) == PODS_LIST
    (binding,) = _docs(s, "ClusterRoleBinding")
    (role,) = _docs(s, "ClusterRole")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ca-daemon", "namespace": "cad"}
    ]
    # Named after the ServiceAccount: two daemons in one cluster must not share it.
    assert role["metadata"]["name"] == "ca-daemon:cad:ca-daemon"
    pinned = [r for r in _linkerd_role(s) if "get" in r["verbs"] and "events" in r["resources"]]
    assert pinned == [
        {
            "apiGroups": [""],
            "resources": ["events"],
            "verbs": ["get", "patch"],
            "resourceNames": ["linkerd-identity-trust-roots.ca-daemon-pods-pending"],
        }
    ]


def test_confirm_events_reads_linkerd_s_events_and_identity_pods_in_its_namespace_only(
    make_settings: Make,
) -> None:
    linkerd = {
        "gate": "time",
        "restart": "none",
        "confirm": "events",
        "emergency_restart": "as-restart",
    }
    s = make_settings({"linkerd": linkerd})
    rules = _linkerd_role(s)
    assert _grants(rules, "", "events") == {"create", "list", "get", "patch"}
    assert _grants(rules, "", "pods") == {"list"}
    pinned = [r for r in rules if "get" in r["verbs"] and "events" in r["resources"]]
    assert pinned[1:] == [
        {
            "apiGroups": [""],
            "resources": ["events"],
            "verbs": ["get", "patch"],
            "resourceNames": ["linkerd-identity-issuer.ca-daemon-issuer-unconfirmed"],
        }
    ]
    assert _cluster_rules(s) == PODS_LIST  # beyond the control plane's namespace: the gate


def test_restart_control_plane_patches_deployments_in_linkerd_only(make_settings: Make) -> None:
    linkerd = {"gate": "time", "restart": "control-plane", "emergency_restart": "as-restart"}
    s = make_settings({"linkerd": linkerd})
    assert _grants(_linkerd_role(s), "apps", "deployments") == {"list", "patch"}
    assert _cluster_rules(s) == PODS_LIST
    for role in _docs(s, "Role"):
        if role["metadata"]["namespace"] != "linkerd":
            assert _grants(role["rules"], "apps", "deployments") == set()


@pytest.mark.parametrize("gate", ["time", "pods"])
def test_restart_all_patches_workloads_cluster_wide(make_settings: Make, gate: str) -> None:
    s = make_settings({"linkerd": {"gate": gate, "restart": "all"}})
    rules = _cluster_rules(s)
    assert _grants(rules, "", "pods") == {"list"}  # to find the meshed workloads
    assert _grants(rules, "apps", "replicasets") == {"get"}
    for workload in ("deployments", "statefulsets", "daemonsets"):
        assert _grants(rules, "apps", workload) == {"get", "patch"}
    # Never more than that: no writes to Pods, no deletes, no secrets cluster-wide.
    verbs = {verb for rule in rules for verb in rule["verbs"]}
    assert verbs == {"list", "get", "patch"}
    assert _grants(rules, "", "secrets") == set()


def test_linkerd_disabled_needs_nothing_for_it(make_settings: Make) -> None:
    s = make_settings({"linkerd": {"enabled": False, "restart": "all", "gate": "pods"}})
    assert _docs(s, "ClusterRole") == []
    assert all(d["metadata"]["namespace"] != "linkerd" for d in _docs(s, "Role"))


def _lease_rules(settings: Settings, ns: str) -> list[dict[str, Any]]:
    roles = [d for d in _docs(settings, "Role") if d["metadata"]["namespace"] == ns]
    return [r for role in roles for r in role["rules"] if "leases" in r["resources"]]


def test_leader_election_gets_and_updates_its_one_lease_in_the_sa_namespace(
    make_settings: Make,
) -> None:
    s = make_settings({"publish": {"kubernetes": {"enabled": True}}})
    rules = _lease_rules(s, "cad")
    assert rules == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "update"],
            "resourceNames": ["ca-daemon"],
        },
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]
    (binding,) = [d for d in _docs(s, "RoleBinding") if d["metadata"]["namespace"] == "cad"]
    assert binding["subjects"][0]["name"] == "ca-daemon"
    # Nowhere else, and not cluster-wide.
    others = {d["metadata"]["namespace"] for d in _docs(s, "Role")} - {"cad"}
    assert all(_lease_rules(s, ns) == [] for ns in others)
    assert all("leases" not in r["resources"] for r in _cluster_rules(s))


def test_the_lease_follows_leader_election_namespace_and_name(make_settings: Make) -> None:
    s = make_settings(
        {
            "publish": {"kubernetes": {"enabled": True}},
            "leader_election": {"namespace": "ops", "lease": "cad-leader"},
        }
    )
    assert _lease_rules(s, "cad") == []
    (get_update, _) = _lease_rules(s, "ops")
    assert get_update["resourceNames"] == ["cad-leader"]


def test_no_lease_without_leader_election(make_settings: Make) -> None:
    off = make_settings(
        {"publish": {"kubernetes": {"enabled": True}}, "leader_election": {"enabled": False}}
    )
    assert _lease_rules(off, "cad") == []
    embedded = make_settings()  # directory publishing: leader election off by default
    assert _lease_rules(embedded, "cad") == []


def _role_rules(settings: Settings, namespace: str) -> list[dict[str, Any]]:
    (role,) = [d for d in _docs(settings, "Role") if d["metadata"]["namespace"] == namespace]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def test_a_pass_lists_where_it_writes_many_objects_and_reads_single_ones_by_name(
    make_settings: Make,
) -> None:
    """Reading is one LIST per namespace and kind holding several objects (list cannot
    be pinned by name); a single object is read with the pinned get instead."""
    clients = [
        {"name": f"c{i}", "common_name": f"kong.c{i}.upstream", "service": f"pay/api-{i}"}
        for i in range(3)
    ]
    s = make_settings(
        {
            "kong": {
                "namespace": "kong",
                "clients": [
                    *clients,
                    {"name": "one", "common_name": "kong.one.upstream", "service": "solo/api"},
                    {"name": "orders", "common_name": "kong.orders.upstream"},
                ],
            },
            "bundles": [
                {"namespace": "bundles", "configmap": "upstream-trust"},
                {"namespace": "bundles", "configmap": "other-trust"},
            ],
        }
    )
    pay = _role_rules(s, "pay")
    assert _grants(pay, "", "secrets") == {"get", "update", "create", "list"}
    assert _grants(pay, "", "services") == {"get", "patch", "list"}
    assert _grants(pay, "", "configmaps") == set()
    solo = _role_rules(s, "solo")
    assert _grants(solo, "", "secrets") == {"get", "update", "create"}
    assert _grants(solo, "", "services") == {"get", "patch"}
    bundles = _role_rules(s, "bundles")
    assert _grants(bundles, "", "configmaps") == {"get", "update", "create", "list"}
    assert _grants(bundles, "", "secrets") == set()
    linkerd = _role_rules(s, "linkerd")
    assert _grants(linkerd, "", "configmaps") == {"get", "update", "create"}
    assert _grants(linkerd, "", "secrets") == {"get", "update", "create"}
    for rule in pay + solo + bundles + linkerd:
        core = rule["apiGroups"] == [""] and rule["resources"] != ["events"]
        if core and {"get", "update", "patch"} & set(rule["verbs"]):
            assert rule.get("resourceNames"), rule  # reads and writes by name stay pinned
    # Never cluster-wide.
    assert _grants(_cluster_rules(s), "", "secrets") == set()
    assert _grants(_cluster_rules(s), "", "configmaps") == set()


def test_config_rbac_for_a_linked_cluster_grants_its_linkerd_and_nothing_of_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(tmp_path / "data")}},
                "publish": {"kubernetes": {"enabled": True}},
                "server": {"auth": "kubernetes"},
                "kong": {"clients": [{"name": "pay", "common_name": "kong.pay"}]},
                "clusters": [
                    {"name": "west"},
                    {
                        "name": "east",
                        "kubeconfig": "/etc/east.kubeconfig",
                        "linkerd": {"namespace": "l5d-east"},
                        "bundles": [{"namespace": "shop", "configmap": "trust"}],
                    },
                ],
            }
        )
    )
    assert main(["config", "rbac", str(config), "--cluster", "east"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    # Its Linkerd namespace and its bundle copy; no Kong, no Lease, no review APIs there.
    assert set(roles) == {"l5d-east", "shop"}
    text = yaml.safe_dump(docs)
    assert "leases" not in text and "tokenreviews" not in text and "kong" not in text
    assert main(["config", "rbac", str(config)]) == 0
    home = list(yaml.safe_load_all(capsys.readouterr().out))
    assert "linkerd" in {d["metadata"].get("namespace") for d in home}
    assert "l5d-east" not in yaml.safe_dump(home)
    assert main(["config", "rbac", str(config), "--cluster", "south"]) == 2
    assert "no cluster 'south' (one of: west, east)" in capsys.readouterr().err
