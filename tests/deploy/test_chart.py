"""The Helm chart (charts/ca-daemon): lint and render clean, apply to a real kube-apiserver,
grant exactly what `ca-daemon config rbac` grants, and let the daemon do a full pass and a
root rotation as the chart's ServiceAccount while refusing it everything else."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_daemon.config.loading import load_settings
from ca_daemon.model.state import Phase
from ca_daemon.report.rbac import manifests
from ca_daemon.report.verify import Thresholds
from ca_daemon.report.verify_cluster import verify_cluster
from ca_daemon.rotation.engine import Engine
from ca_daemon.service.wiring import build_runtime
from ca_daemon.util.kube import api_client
from tests.support.cli import daemon_env
from tests.support.kube_cluster import await_rbac
from tests.support.linkerd_identity import IdentityStandIn
from tests.support.metrics_exposition import METRIC_NAME, default_settings, exposition, samples
from tests.support.rotation_harness import Clock
from tests.support.servers.helm import Helm
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.tools import free_port, unique

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ca-daemon"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"

# The chart's own ClusterRole next to the configuration's: the operators' one.
ROTATE_ROLE_SUFFIX = ":rotate"
EMERGENCY_ROLE_SUFFIX = ":emergency"


def render(
    helm: Helm,
    tmp_path: Path,
    *values: dict[str, Any],
    namespace: str = "ca-daemon",
    files: tuple[Path, ...] = (),
) -> list[dict[str, Any]]:
    args = ["template", "ca-daemon", str(CHART), "--namespace", namespace]
    for f in files:
        args += ["--values", str(f)]
    for i, v in enumerate(values):
        path = tmp_path / f"values-{i}.yaml"
        path.write_text(yaml.safe_dump(v))
        args += ["--values", str(path)]
    out = helm.run(*args, check=False)
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr.lower(), out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def rendered_config(docs: list[dict[str, Any]], tmp_path: Path) -> Path:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    path = tmp_path / "chart-config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return path


def _norm(rules: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rules)


def _split_rbac(docs: list[dict[str, Any]]) -> tuple[dict[str, list[str]], list[str]]:
    """(namespace -> the configuration's Role rules, the configuration's ClusterRole rules)."""
    roles: dict[str, list[str]] = {}
    cluster: list[str] = []
    for d in docs:
        name = d["metadata"]["name"]
        if d["kind"] == "Role":
            assert d["metadata"]["namespace"] not in roles, "one Role per namespace"
            roles[d["metadata"]["namespace"]] = _norm(d["rules"])
        elif d["kind"] == "ClusterRole" and not name.endswith(
            (ROTATE_ROLE_SUFFIX, EMERGENCY_ROLE_SUFFIX)
        ):
            cluster = _norm(d["rules"])
    return roles, cluster


# --- lint and render ---------------------------------------------------------------------


@pytest.mark.parametrize("features", ["default", "all"])
def test_lint_and_template_are_clean(helm: Helm, tmp_path: Path, features: str) -> None:
    files = (ALL_FEATURES,) if features == "all" else ()
    lint = helm.run(
        "lint", "--strict", str(CHART), *[a for f in files for a in ("-f", str(f))], check=False
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(helm, tmp_path, files=files)
    kinds = {d["kind"] for d in docs}
    base = {
        "Deployment",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
    }
    optional = {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"}
    assert base <= kinds
    if features == "all":
        assert optional <= kinds
        assert any(d["metadata"]["name"].endswith("-dashboard") for d in docs)
    else:
        assert not kinds & optional
    # The configuration the chart renders is one the daemon accepts.
    load_settings(rendered_config(docs, tmp_path))


def test_package_includes_the_rules_and_dashboard(helm: Helm, tmp_path: Path) -> None:
    out = helm.run("package", str(CHART), "-d", str(tmp_path), check=False)
    assert out.returncode == 0, out.stderr
    listing = subprocess.run(
        ["tar", "tzf", str(tmp_path / "ca-daemon-0.1.0.tgz")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "ca-daemon/files/ca-daemon.rules.yaml" in listing
    assert "ca-daemon/files/ca-daemon.json" in listing
    assert "ca-daemon/values.schema.json" in listing


def test_deployment_is_hardened(helm: Helm, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert sa["automountServiceAccountToken"] is False
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2
    assert pod["automountServiceAccountToken"] is False
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and isinstance(psc["runAsUser"], int)
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"]
    # No service links: a Service named ca-daemon* would put CA_DAEMON_PORT and the like
    # under the daemon's own prefix. Pod network and DNS are Kubernetes' defaults.
    assert pod["enableServiceLinks"] is False
    assert "hostNetwork" not in pod and "dnsPolicy" not in pod
    # The identity the Lease holder takes (POD_NAME before HOSTNAME).
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    volumes = {v["name"]: v for v in pod["volumes"]}
    vault = volumes["vault-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert vault["audience"] == "vault"
    config = yaml.safe_load(rendered_config(docs, tmp_path).read_text())
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["vault-token"]
    assert config["anchor"]["vault"]["auth"]["jwt_file"] == f"{mount}/{vault['path']}"
    assert config["anchor"]["vault"]["auth"]["method"] == "kubernetes"
    assert config["leader_election"] == {"enabled": True, "namespace": "ca-daemon"}
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1


def test_probes_give_the_api_time_to_start_and_survive_a_long_pass(
    helm: Helm, tmp_path: Path
) -> None:
    """The startup probe holds liveness and readiness back until the API listens (the
    readiness probe used to start at once); each probe waits 5 s for an answer (the API
    answers within a second during a pass at 5,000 clients, tests/api/test_server_limits.py);
    every timing is a value, checked by the schema."""
    (dep,) = [d for d in render(helm, tmp_path) if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    startup, live, ready = c["startupProbe"], c["livenessProbe"], c["readinessProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "http"}
    assert live["httpGet"] == {"path": "/healthz", "port": "http"}
    assert ready["httpGet"] == {"path": "/readyz", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert all(p["timeoutSeconds"] == 5 for p in (startup, live, ready))
    assert "initialDelaySeconds" not in ready  # the startup probe is the delay
    assert live["periodSeconds"] * live["failureThreshold"] >= 30

    changed = {"probes": {"readiness": {"periodSeconds": 2, "initialDelaySeconds": 1}}}
    (dep,) = [d for d in render(helm, tmp_path, changed) if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["periodSeconds"] == 2
    assert c["readinessProbe"]["initialDelaySeconds"] == 1
    assert c["readinessProbe"]["timeoutSeconds"] == 5  # the other defaults stay

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"probes": {"liveness": {"timeoutSecond": 5}}}))
    out = helm.run("template", "x", str(CHART), "--values", str(bad), check=False)
    assert out.returncode != 0 and "/probes/liveness" in out.stderr, out.stderr


def test_host_network_and_dns_policy_are_values(helm: Helm, tmp_path: Path) -> None:
    values = {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}
    (dep,) = [d for d in render(helm, tmp_path, values) if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["enableServiceLinks"] is False
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"dnsPolicy": "ClusterFirstWithHostNetwork"}))
    out = helm.run("template", "x", str(CHART), "--values", str(bad), check=False)
    assert out.returncode != 0 and "/dnsPolicy" in out.stderr, out.stderr


def test_the_vault_token_reviewer_is_rendered_only_when_asked_for(
    helm: Helm, tmp_path: Path
) -> None:
    def reviewer(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {d["kind"]: d for d in docs if "vault-reviewer" in d["metadata"]["name"]}

    assert reviewer(render(helm, tmp_path)) == {}
    found = reviewer(render(helm, tmp_path, {"vault": {"tokenReviewer": {"create": True}}}))
    assert sorted(found) == ["ClusterRoleBinding", "Secret", "ServiceAccount"]
    sa = found["ServiceAccount"]
    assert sa["metadata"]["name"] == "ca-daemon-vault-reviewer"
    assert sa["automountServiceAccountToken"] is False
    # Least privilege: the built-in role that creates TokenReviews (and SARs), no more.
    assert found["ClusterRoleBinding"]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:auth-delegator",
    }
    secret = found["Secret"]
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"]["kubernetes.io/service-account.name"] == (
        "ca-daemon-vault-reviewer"
    )


# --- RBAC: the same rules as `ca-daemon config rbac` -------------------------------------

CLIENTS = [
    {
        "name": "payments",
        "common_name": "kong.payments.upstream",
        "secret": "kong-upstream-payments",
        "service": "payments/payments-api",
    },
    {"name": "orders", "common_name": "kong.orders.upstream", "service": "orders-api"},
    {"name": "plain", "common_name": "kong.plain.upstream"},
]
RBAC_CASES: dict[str, dict[str, Any]] = {
    "chart-default": {},
    "restart-all-static-auth": {
        "linkerd": {"restart": "all", "gate": "time", "namespace": "mesh"},
        "server": {"auth": "static"},
        "kong": {"clients": CLIENTS, "namespace": "gateway"},
        "bundles": [
            {"namespace": "payments", "configmap": "trust"},
            {"namespace": "linkerd", "configmap": "extra-trust"},
        ],
    },
    "no-linkerd-admin-api": {
        "linkerd": {"enabled": False},
        "kong": {
            "delivery": "admin-api",
            "admin_api": {"url": "https://kong-admin:8444"},
            "clients": [{"name": "a", "common_name": "a.upstream", "service": "svc-a"}],
        },
    },
    "restart-none-gate-time-no-kong": {
        "linkerd": {
            "restart": "none",
            "gate": "time",
            "trust_roots_configmap": "roots",
            "issuer_secret": "issuer",
        },
        "kong": {"enabled": False},
        "server": {"auth": "kubernetes", "sar": {"group": "example.com", "resource": "rot"}},
    },
    "emergency-as-restart": {
        "linkerd": {"restart": "control-plane", "emergency_restart": "as-restart"},
        "server": {"auth": "kubernetes", "sar": {"emergency_verb": "break-glass"}},
    },
    "gate-pods-restart-control-plane": {
        "linkerd": {"restart": "control-plane", "gate": "pods"},
        # Two Services (and Secrets) in one namespace: read with one LIST.
        "kong": {
            "clients": [
                *CLIENTS[:1],
                {
                    "name": "refunds",
                    "common_name": "kong.refunds.upstream",
                    "service": "payments/refunds-api",
                },
            ]
        },
    },
}


@pytest.mark.parametrize("case", sorted(RBAC_CASES))
def test_rbac_is_what_config_rbac_prints(helm: Helm, tmp_path: Path, case: str) -> None:
    docs = render(helm, tmp_path, {"config": RBAC_CASES[case]}, namespace="cad")
    settings = load_settings(rendered_config(docs, tmp_path))
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    expected_roles, expected_cluster = _split_rbac(manifests(settings, "cad", sa))
    roles, cluster = _split_rbac(docs)
    assert roles == expected_roles
    assert cluster == expected_cluster
    # Leader election is on in the chart: the one Lease, pinned, in its own namespace.
    own = [json.loads(r) for r in roles["cad"]]
    lease_rules = [r for r in own if r["resources"] == ["leases"]]
    assert {v for r in lease_rules for v in r["verbs"]} == {"get", "create", "update"}
    pinned = [r for r in lease_rules if "create" not in r["verbs"]]
    assert pinned and all(r["resourceNames"] == [settings.leader_election.lease] for r in pinned)
    rotate = next(d for d in docs if d["metadata"]["name"].endswith(ROTATE_ROLE_SUFFIX))
    sar = settings.server.sar
    assert rotate["rules"] == [
        {
            "apiGroups": [sar.group],
            "resources": [sar.resource],
            "verbs": sorted({sar.verb, "get"}, key=[sar.verb, "get"].index),
        }
    ]
    # The emergency verb in a role of its own, never aggregated into edit or admin.
    emergency = next(d for d in docs if d["metadata"]["name"].endswith(EMERGENCY_ROLE_SUFFIX))
    assert emergency["rules"] == [
        {"apiGroups": [sar.group], "resources": [sar.resource], "verbs": [sar.emergency_verb]}
    ]
    assert not any("aggregate" in k for k in emergency["metadata"]["labels"])


# --- applied to a real API server --------------------------------------------------------

_PLURALS = {"NetworkPolicy": "networkpolicies"}
_CLUSTER = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def _path(obj: dict[str, Any]) -> str:
    api = obj["apiVersion"]
    prefix = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    plural = _PLURALS.get(obj["kind"], obj["kind"].lower() + "s")
    name = obj["metadata"]["name"]
    if obj["kind"] in _CLUSTER:
        return f"{prefix}/{plural}/{name}"
    return f"{prefix}/namespaces/{obj['metadata']['namespace']}/{plural}/{name}"


def apply(kube: Kube, obj: dict[str, Any]) -> None:
    with kube.http() as http:
        response = http.patch(
            _path(obj),
            params={
                "fieldManager": "helm-chart-test",
                "force": "true",
                "fieldValidation": "Strict",
            },
            content=json.dumps(obj),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )
    assert response.status_code in (200, 201), f"{obj['kind']} {_path(obj)}: {response.text}"


def _crd(kind: str, plural: str) -> dict[str, Any]:
    """A minimal CRD for the prometheus-operator kinds the test apiserver lacks: the
    spec is kept as it is (the real CRDs validate more; promtool checks the rules)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "listKind": f"{kind}List",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def _ensure_crds(kube: Kube) -> None:
    import time

    for kind, plural in (
        ("ServiceMonitor", "servicemonitors"),
        ("PrometheusRule", "prometheusrules"),
    ):
        apply(kube, _crd(kind, plural))
        deadline = time.monotonic() + 30
        with kube.http() as http:
            while http.get(f"/apis/monitoring.coreos.com/v1/{plural}").status_code != 200:
                assert time.monotonic() < deadline, f"CRD {plural} never served"
                time.sleep(0.2)


def _apply_all(kube: Kube, docs: list[dict[str, Any]]) -> None:
    namespaces = {d["metadata"].get("namespace") for d in docs} - {None}
    for ns in sorted(namespaces):
        kube.create_namespace(ns)
    for doc in docs:
        apply(kube, doc)


def test_every_rendered_object_applies(helm: Helm, kube: Kube, tmp_path: Path) -> None:
    _ensure_crds(kube)
    ns = unique("chart-all")
    docs = render(helm, tmp_path, namespace=ns, files=(ALL_FEATURES,))
    # Namespaces the configuration names (the all-features file uses fixed ones).
    _apply_all(kube, docs)
    with kube.http() as http:
        for doc in docs:
            assert http.get(_path(doc)).status_code == 200, _path(doc)


def test_daemon_runs_as_the_charts_service_account(
    helm: Helm,
    kube: Kube,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    linkerd_check: LinkerdCheck,
) -> None:
    ns, linkerd_ns, kong_ns, app_ns, bundle_ns = (
        unique(f"chart-{n}") for n in ("cad", "linkerd", "kong", "pay", "bundles")
    )
    values = {
        "config": {
            "linkerd": {"namespace": linkerd_ns},
            "kong": {
                "namespace": kong_ns,
                "clients": [
                    {
                        "name": "payments",
                        "common_name": "kong.payments.upstream",
                        "secret": "kong-upstream-payments",
                        "service": f"{app_ns}/payments-api",
                    },
                    {"name": "orders", "common_name": "kong.orders.upstream"},
                ],
            },
            "bundles": [{"namespace": bundle_ns, "configmap": "upstream-trust"}],
        }
    }
    docs = render(helm, tmp_path, values, namespace=ns)
    for extra in (linkerd_ns, kong_ns, app_ns, bundle_ns):
        kube.create_namespace(extra)
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "payments-api", "namespace": app_ns},
            "spec": {"ports": [{"port": 443}]},
        }
    )
    _apply_all(kube, docs)
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    token = kube.service_account_token(ns, sa)
    await_rbac(kube, token, f"/api/v1/namespaces/{kong_ns}/secrets", allowed=True)
    await_rbac(kube, token, "/api/v1/pods?limit=1", allowed=True)

    # The chart's configuration, with the local anchor (no Vault here) in a temp dir.
    config = yaml.safe_load(rendered_config(docs, tmp_path).read_text())
    config["anchor"] = {"backend": "local", "local": {"dir": str(tmp_path / "data")}}
    config["server"]["address"] = f"127.0.0.1:{free_port()}"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    kubeconfig = kube.write_kubeconfig(token, tmp_path / "sa.kubeconfig")
    env = daemon_env({"KUBECONFIG": str(kubeconfig)})

    def daemon(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ca_daemon", *args, "--config", str(config_file)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    first = daemon("run", "--once")
    assert first.returncode == 0, first.stdout + first.stderr
    verified = daemon("verify", "--kubeconfig", str(kubeconfig))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    with kube.http() as http:
        issuer = http.get(f"/api/v1/namespaces/{linkerd_ns}/secrets/linkerd-identity-issuer")
        assert issuer.status_code == 200
        assert issuer.json()["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ca-daemon"

    # A whole root rotation, still as the chart's ServiceAccount (simulated clock), with
    # Linkerd's identity controller confirming the new issuer (through its Events).
    _rotate_root_as(kubeconfig, config_file, monkeypatch, kube, linkerd_ns, linkerd_check)

    # And nothing else: a Secret the chart does not name, in a namespace it writes to.
    with kube.http() as http:
        http.post(
            f"/api/v1/namespaces/{linkerd_ns}/secrets",
            json={"metadata": {"name": "not-ours"}, "data": {}},
        )
    with kube.http(token=token) as http:
        for path in (
            f"/api/v1/namespaces/{linkerd_ns}/secrets/not-ours",
            f"/api/v1/namespaces/{linkerd_ns}/secrets",
            f"/api/v1/namespaces/{app_ns}/secrets",
            f"/api/v1/namespaces/{ns}/secrets",
        ):
            assert http.get(path).status_code == 403, path


def _rotate_root_as(
    kubeconfig: Path,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    kube: Kube,
    linkerd_ns: str,
    linkerd_check: LinkerdCheck,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    settings = load_settings(config_file)
    runtime = build_runtime(settings)
    clock = Clock(datetime.now(UTC))
    identity = IdentityStandIn(
        kube, linkerd_ns, linkerd_check, config_file.parent, lambda: clock.now
    )
    engine = Engine(
        settings,
        runtime.anchor,
        runtime.journal,
        runtime.publishers,
        clock=clock,
        rollout=runtime.rollout,
    )
    before = [r.ref for r in engine.journal.load().state.ca.roots]
    engine.request_rotation("trust-anchor", "chart test")
    actions: list[str] = []
    for _ in range(200):
        result = engine.reconcile()
        assert result.ok, result.errors
        assert result.state is not None
        actions += [s.action for s in result.steps]
        if "Retire" in actions:
            break
        if result.state.ca.phase is Phase.PROPAGATING and not identity.restarts:
            identity.restart()  # rolled: it reads the two-root bundle
        if identity.restarts:
            identity.sync()
        clock.now += timedelta(hours=6)
    assert "Activate" in actions and "Retire" in actions, actions
    assert [e["reason"] for e in identity.events][:1] == ["IssuerUpdated"], identity.events
    after = [r.ref for r in engine.journal.load().state.ca.roots]
    assert len(after) == 1 and after != before
    # What is published checks out as Linkerd and Kong would see it, at the clock's time.
    report = verify_cluster(api_client(kubeconfig), settings, clock.now, Thresholds())
    assert report.ok, report.problems


# --- the PrometheusRule ------------------------------------------------------------------


def test_promtool_checks_the_rendered_prometheus_rule(
    helm: Helm, promtool: str, tmp_path: Path
) -> None:
    docs = render(helm, tmp_path, {"prometheusRule": {"enabled": True}})
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    path = tmp_path / "rendered.rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    source = yaml.safe_load((ROOT / "policies" / "prometheus" / "ca-daemon.rules.yaml").read_text())
    assert rule["spec"] == source, "the PrometheusRule is the shipped rule file, unchanged"
    assert rule["spec"]["groups"][0]["rules"]


def test_dashboard_configmap_is_the_dashboard(helm: Helm, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, {"grafanaDashboard": {"enabled": True}})
    (cm,) = [d for d in docs if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((ROOT / "policies" / "grafana" / "ca-daemon.json").read_text())
    assert json.loads(cm["data"]["ca-daemon.json"]) == shipped


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"linkerd": {"restrat": "all"}}, "/config/linkerd"),
        ({"rotation": {"check_interval": 60}}, "/config/rotation/check_interval"),
        ({"linkerd": {"issuer": {"lifetime": "2 days"}}}, "/config/linkerd/issuer/lifetime"),
        ({"anchor": {"backend": "consul"}}, "/config/anchor/backend"),
    ],
)
def test_values_schema_refuses_what_the_daemon_refuses(
    helm: Helm, tmp_path: Path, config: dict[str, Any], where: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"config": config}))
    out = helm.run("template", "x", str(CHART), "--values", str(path), check=False)
    assert out.returncode != 0
    assert where in out.stderr, out.stderr


# --- the Grafana dashboard ---------------------------------------------------------------

DASHBOARD = ROOT / "policies" / "grafana" / "ca-daemon.json"


def test_dashboard_has_the_schema_basics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 30
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for p in panels:
        assert p["title"] and p["type"] and p["gridPos"]
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for wanted in ("time left", "phase", "pending", "rotations", "failures", "publish", "drift"):
        assert wanted in titles, wanted


def test_dashboard_queries_only_exported_metrics(tmp_path: Path) -> None:
    exported = samples(exposition(default_settings(tmp_path), troubled=True))
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        name
        for p in dashboard["panels"]
        for t in p["targets"]
        for name in METRIC_NAME.findall(t["expr"])
    }
    assert len(used) >= 12, used
    missing = sorted(used - set(exported))
    assert not missing, f"the dashboard queries metrics the daemon does not export: {missing}"
