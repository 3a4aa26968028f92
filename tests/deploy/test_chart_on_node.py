"""The chart as it is deployed: `helm install` on a real single-node Kubernetes, two real
daemon Pods from the image the shipped Dockerfile builds, Vault's Kubernetes auth checked
by a real TokenReview, and a whole root rotation requested from outside the cluster while
the leader Pod is deleted, twice. Then `helm upgrade` and `helm uninstall`.

The tests run in order on one installation (each step builds on the one before), as an
operator's day does. Linkerd and Kong are stand-ins whose Pods really run: the control
plane really restarts when the daemon rolls it, and the meshed workload's Pods hold the
trust bundle they were started with (tests/support/chart_deployment.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.publish.linkerd_rollout import PENDING_REASON, RESTARTED_AT
from ca_daemon.publish.pods_gate import pending_event_name
from tests.support.chart_deployment import (
    APP,
    APP_NS,
    IDENTITY,
    ISSUER_SECRET,
    KONG_NS,
    LINKERD_DEPLOYMENTS,
    LINKERD_NS,
    NAMESPACE,
    PROPAGATION_DELAY,
    RELEASE,
    ROOT,
    TRUST_ROOTS,
    Release,
    ServiceFront,
    api_url,
    app_service,
    b64,
    cli_env,
    client,
    configure_vault,
    daemon_pods,
    inject_app,
    install_control_plane,
    is_ready,
    lease_holder,
    metric,
    operator_token,
    rolled_out,
    trust_bundle,
    values,
    wait_ready_pods,
)
from tests.support.cluster_rotation import VAULT_BACKDATE
from tests.support.invariants import InvariantChecker, read_cluster
from tests.support.relay import Relay
from tests.support.servers.helm import Helm
from tests.support.servers.images import ca_daemon_image
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.node import HOST_IP, Node, processes, wait_for
from tests.support.servers.openbao import OpenBao, own_openbao

pytestmark = pytest.mark.integration

CLIENTS = [client("payments", service=f"{APP_NS}/{APP}"), client("orders")]
# Where each client's Secret is: a client with a Service gets it in that Service's namespace.
CLIENT_SECRETS = {
    "payments": (APP_NS, "kong-upstream-payments"),
    "orders": (KONG_NS, "kong-upstream-orders"),
}


@dataclass
class Deployed:
    node: Node
    release: Release
    bao: OpenBao
    values: dict[str, Any]
    workdir: Path

    @property
    def kube(self) -> Any:
        return self.node.kube

    def config_file(self) -> Path:
        """The daemon's configuration as the chart renders it, for the CLI's verify."""
        config = {**self.values["config"], "publish": {"kubernetes": {"enabled": True}}}
        path = self.workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def get(self, path: str) -> Any:
        return self.kube.get(path)


@pytest.fixture(scope="module")
def deployed(
    node: Node, helm: Helm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    workdir = tmp_path_factory.mktemp("chart-on-node")
    image = ca_daemon_image(ROOT)
    node.load(image)
    kube = node.kube
    with own_openbao(workdir, host=HOST_IP) as bao:
        configure_vault(kube, bao, workdir)
        for ns in (LINKERD_NS, KONG_NS, APP_NS):
            kube.create_namespace(ns)
        install_control_plane(kube, image)
        app_service(kube)
        release = Release(node, helm, workdir)
        content = values(image, kube, bao, CLIENTS)
        release.install(release.write_values(content, "values.yaml"))
        yield Deployed(node, release, bao, content, workdir)
        release.run("uninstall", RELEASE, "--wait")


def _pod_named(deployed: Deployed, name: str) -> dict[str, Any]:
    return next(p for p in daemon_pods(deployed.kube) if p["metadata"]["name"] == name)


def _leader_and_standby(deployed: Deployed) -> tuple[dict[str, Any], dict[str, Any]]:
    pods = wait_ready_pods(deployed.release, 2)
    names = {p["metadata"]["name"] for p in pods}
    wait_for(
        "one daemon Pod holds the Lease",
        lambda: lease_holder(deployed.kube) in names,
        60,
        deployed.release.pods_detail,
    )
    leader = lease_holder(deployed.kube)
    return (
        _pod_named(deployed, leader),
        next(p for p in pods if p["metadata"]["name"] != leader),
    )


def _daemon_processes() -> list[int]:
    """PIDs of `ca-daemon run` processes on this machine (the Pods' main processes)."""
    return [
        pid
        for pid, argv in processes().items()
        if any(a.endswith("/ca-daemon") for a in argv[:2])
        and "run" in argv
        and "/etc/ca-daemon/config.yaml" in argv
    ]


def test_both_pods_run_hardened_and_exactly_one_leads(deployed: Deployed) -> None:
    leader, standby = _leader_and_standby(deployed)
    # Exactly one leads, as each replica says on its own /metrics.
    wait_for("the leader says so on /metrics", lambda: metric(leader, "ca_daemon_leader") == 1, 30)
    assert metric(standby, "ca_daemon_leader") == 0
    for pod in (leader, standby):
        for probe in ("/healthz", "/readyz"):
            assert httpx.get(api_url(pod) + probe, timeout=5).status_code == 200, probe
    # The processes the kubelet started run as UID 10001 on a read-only root filesystem.
    pids = _daemon_processes()
    assert len(pids) == 2, pids
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["10001"] * 4, uid_line
        root = next(
            line.split()
            for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            if line.split()[4] == "/"
        )
        assert "ro" in root[5].split(","), root


def test_first_pass_publishes_everything_and_verify_passes(
    deployed: Deployed, linkerd_check: LinkerdCheck
) -> None:
    kube = deployed.kube
    paths = [
        f"/api/v1/namespaces/{LINKERD_NS}/secrets/{ISSUER_SECRET}",
        f"/api/v1/namespaces/{LINKERD_NS}/configmaps/{TRUST_ROOTS}",
        *(f"/api/v1/namespaces/{ns}/secrets/{name}" for ns, name in CLIENT_SECRETS.values()),
    ]
    wait_for(
        "the first pass published the issuer, trust roots and Kong clients",
        lambda: all(deployed.get(p) is not None for p in paths),
        120,
        deployed.release.pods_detail,
    )
    service = deployed.get(f"/api/v1/namespaces/{APP_NS}/services/{APP}")
    annotations = service["metadata"].get("annotations") or {}
    assert annotations.get("konghq.com/client-cert") == "kong-upstream-payments", annotations
    # The control plane started once the trust roots existed; the workload is injected.
    bundle = trust_bundle(kube)
    inject_app(kube, bundle)
    for ns, name in [(LINKERD_NS, d) for d in LINKERD_DEPLOYMENTS] + [(APP_NS, APP)]:
        wait_for(f"{ns}/{name} rolled out", partial(rolled_out, kube, ns, name), 120)
    _check_linkerd(deployed, linkerd_check)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ca_daemon",
            "verify",
            "--config",
            str(deployed.config_file()),
            "--kubeconfig",
            str(kube.admin_kubeconfig),
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _check_linkerd(deployed: Deployed, linkerd_check: LinkerdCheck) -> None:
    """Linkerd's own checks accept the trust roots and the issuer as published now."""
    issuer = deployed.get(f"/api/v1/namespaces/{LINKERD_NS}/secrets/{ISSUER_SECRET}")
    files = {
        "bundle.pem": trust_bundle(deployed.kube).encode(),
        "issuer.crt": b64(issuer, "tls.crt"),
        "issuer.key": b64(issuer, "tls.key"),
    }
    for name, data in files.items():
        path = deployed.workdir / name
        path.write_bytes(data)
        path.chmod(0o600)
    bundle, crt, key = (deployed.workdir / n for n in files)
    code, output = linkerd_check(bundle, crt, key)
    assert code == 0, output


def _roots(deployed: Deployed) -> list[str]:
    return [
        fingerprint(c)
        for c in parse_pem_certificates(trust_bundle(deployed.kube).encode(), what="bundle")
    ]


def _issuer_root(deployed: Deployed, roots: dict[str, Any]) -> str | None:
    issuer = deployed.get(f"/api/v1/namespaces/{LINKERD_NS}/secrets/{ISSUER_SECRET}")
    cert = parse_pem_certificates(b64(issuer, "tls.crt"), what="issuer")[0]
    return next((fp for fp, root in roots.items() if directly_issued_by(cert, root)), None)


def _pending_event(deployed: Deployed) -> str:
    name = pending_event_name(TRUST_ROOTS)
    event = deployed.get(f"/api/v1/namespaces/{LINKERD_NS}/events/{name}")
    if event is None or event.get("reason") != PENDING_REASON:
        return ""
    return str(event.get("message", ""))


def _control_plane_pods(deployed: Deployed) -> dict[str, str]:
    """uid -> name of the running control-plane Pods."""
    listed = deployed.get(f"/api/v1/namespaces/{LINKERD_NS}/pods")
    return {p["metadata"]["uid"]: p["metadata"]["name"] for p in listed["items"]}


def _control_plane_restarted(deployed: Deployed, before: dict[str, str]) -> bool:
    """Every control-plane Deployment rolled out, none of its Pods from ``before``."""
    rolled = all(rolled_out(deployed.kube, LINKERD_NS, d) for d in LINKERD_DEPLOYMENTS)
    return rolled and not set(_control_plane_pods(deployed)) & set(before)


def _delete_pod(deployed: Deployed, name: str, force: bool) -> None:
    params = {"gracePeriodSeconds": "0"} if force else {}
    with deployed.kube.http() as http:
        response = http.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}", params=params)
    assert response.status_code == 200, response.text


@pytest.mark.timeout(1200)
def test_root_rotation_through_the_pods_survives_deleting_the_leader_twice(
    deployed: Deployed, linkerd_check: LinkerdCheck
) -> None:
    kube = deployed.kube
    leader, standby = _leader_and_standby(deployed)
    old_roots = _roots(deployed)
    assert len(old_roots) == 1
    control_plane_before = _control_plane_pods(deployed)
    # The test sees a bundle change up to one poll (~2s) after the daemon confirmed it.
    checker = InvariantChecker(PROPAGATION_DELAY - timedelta(seconds=4), VAULT_BACKDATE)
    token = operator_token(kube, deployed.workdir)
    cli_log = deployed.workdir / "rotate.log"
    # The chart's configuration (server.auth: kubernetes): the CLI sends the operator's token.
    rotate = [
        sys.executable,
        "-m",
        "ca_daemon",
        "rotate",
        "trust-anchor",
        "--config",
        str(deployed.config_file()),
        "--token-file",
        str(token),
        "--reason",
        "yearly trust-anchor rotation",
    ]
    # The request reaches the standby: it is accepted there, for the leader to carry out.
    asked = subprocess.run(
        [*rotate, "--url", api_url(standby)], env=cli_env(), capture_output=True, text=True
    )
    assert asked.returncode == 0, asked.stdout + asked.stderr
    op_id = asked.stdout.split()[1].rstrip(":")
    # Then followed through the Service to the end, whichever Pods come and go: asking
    # again joins the same operation.
    front = Relay(ServiceFront(kube))
    front.open()
    cli = subprocess.Popen(
        [*rotate, "--wait=retired", "--url", f"http://127.0.0.1:{front.port}"],
        env=cli_env(),
        stdout=cli_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    started = time.monotonic()

    def progress(event: str) -> None:
        seen["progress"].append(f"{time.monotonic() - started:6.1f}s {event}")

    seen: dict[str, Any] = {
        "graceful": None,
        "forced": None,
        "gate_held": False,
        "reinjected": False,
        "polls": 0,
        "progress": [],
    }
    roots: dict[str, Any] = {}
    deadline = time.monotonic() + 900
    try:
        while cli.poll() is None:
            assert time.monotonic() < deadline, (
                f"the rotation did not finish in 15 minutes: {seen}\n{cli_log.read_text()}\n"
                f"{_pending_event(deployed)}\n{deployed.release.pods_detail()}"
            )
            _observe(deployed, checker, linkerd_check, roots)
            seen["polls"] += 1
            now_roots = _roots(deployed)
            new_roots = [r for r in now_roots if r not in old_roots]
            issuer_root = _issuer_root(deployed, roots)
            holder = lease_holder(kube)
            if new_roots and seen["graceful"] is None and holder:
                # The new root is in the bundles, the old one still signs: delete the leader.
                _delete_pod(deployed, holder, force=False)
                seen["graceful"] = holder
                progress(f"new root in the bundle; deleted the leader {holder}")
            if (
                new_roots
                and not seen["reinjected"]
                and issuer_root in old_roots
                and _control_plane_restarted(deployed, control_plane_before)
                and APP in _pending_event(deployed)
            ):
                # The control plane runs new Pods holding the new bundle; the workload's Pod
                # still holds the old one: the gate must keep the issuer under the old root.
                time.sleep(6)  # two more passes
                assert _issuer_root(deployed, roots) in old_roots, "the gate did not hold"
                message = _pending_event(deployed)
                assert APP in message, message
                seen["gate_held"] = True
                inject_app(kube, trust_bundle(kube))
                seen["reinjected"] = True
                progress(f"the gate held ({message}); re-injected the workload")
            if issuer_root in new_roots and seen["forced"] is None and holder:
                # The new root signs: force-delete whoever leads now, mid-retirement wait.
                _delete_pod(deployed, holder, force=True)
                seen["forced"] = holder
                progress(f"the new root signs; force-deleted the leader {holder}")
            time.sleep(1)
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.wait()
        front.cut()
        output = cli_log.read_text()
    assert cli.returncode == 0, f"{seen}\n{output}\n{deployed.release.pods_detail()}"
    assert output.startswith(f"operation {op_id}: trust-anchor"), output  # joined, not new
    assert seen["graceful"] and seen["forced"], seen
    assert seen["gate_held"] and seen["reinjected"], seen
    # The whole rotation happened: only the new root is left, and it signs everything.
    final_roots = _roots(deployed)
    assert len(final_roots) == 1 and final_roots[0] not in old_roots, final_roots
    assert _issuer_root(deployed, roots) == final_roots[0]
    published = read_cluster(
        deployed.get, LINKERD_NS, KONG_NS, {n: CLIENT_SECRETS[n] for n in CLIENT_SECRETS}
    )
    new_root = roots[final_roots[0]]
    for name, chain in published.clients.items():
        assert directly_issued_by(chain[-1], new_root), name
    # The control plane was really re-created (new Pods), by the daemon's roll.
    after = _control_plane_pods(deployed)
    assert not set(after) & set(control_plane_before), (control_plane_before, after)
    for name in LINKERD_DEPLOYMENTS:
        live = deployed.get(f"/apis/apps/v1/namespaces/{LINKERD_NS}/deployments/{name}")
        assert RESTARTED_AT in (live["spec"]["template"]["metadata"].get("annotations") or {})
    _check_linkerd(deployed, linkerd_check)
    # Linkerd's identity controller, really restarted by the roll, loaded each issuer it
    # was handed (under the new root too) and said so; retirement waited for that word.
    events = deployed.get(
        f"/api/v1/namespaces/{LINKERD_NS}/events?fieldSelector=involvedObject.name={IDENTITY}"
    )
    reasons = [e["reason"] for e in events["items"]]
    assert "IssuerUpdated" in reasons and "IssuerUpdateSkipped" not in reasons, reasons
    # The re-created Pods are back: two Ready, one leads, the other stands by.
    leader, standby = _leader_and_standby(deployed)
    assert leader["metadata"]["name"] not in (seen["graceful"], seen["forced"])
    assert metric(standby, "ca_daemon_leader") == 0
    assert checker.observations == seen["polls"] > 10


def test_an_emergency_through_the_pods_rolls_the_workload_and_retires_on_proof(
    deployed: Deployed, linkerd_check: LinkerdCheck
) -> None:
    """`rotate trust-anchor --emergency` from outside the cluster, as an operator bound to
    the chart's emergency role too: the daemon (configured with linkerd.restart:
    control-plane) rolls the meshed workload as well, three times; this test plays
    Linkerd's injector when the gate names the workload (a rolled Pod keeps the bundle
    its template was injected with). The old root leaves every bundle once every Pod
    restarted twice and holds the new root alone, not when the old chain expires."""
    kube = deployed.kube
    old_roots = _roots(deployed)
    assert len(old_roots) == 1
    token = operator_token(kube, deployed.workdir)
    kube.bind_cluster_role(
        "platform-operator-emergency",
        f"ca-daemon:{NAMESPACE}:{RELEASE}:emergency",
        "default",
        "platform-operator",
    )
    checker = InvariantChecker(PROPAGATION_DELAY - timedelta(seconds=4), VAULT_BACKDATE)
    cli_log = deployed.workdir / "emergency.log"
    front = Relay(ServiceFront(kube))
    front.open()
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ca_daemon",
            "rotate",
            "trust-anchor",
            "--emergency",
            "--reason",
            "drill: issuer key leaked",
            "--wait=retired",
            "--config",
            str(deployed.config_file()),
            "--token-file",
            str(token),
            "--url",
            f"http://127.0.0.1:{front.port}",
        ],
        env=cli_env(),
        stdout=cli_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    roots: dict[str, Any] = {}
    app_rolls: set[str] = set()
    injected: list[int] = []  # bundle sizes the workload was re-injected with
    deadline = time.monotonic() + 600
    try:
        while cli.poll() is None:
            assert time.monotonic() < deadline, (
                f"the emergency did not finish in 10 minutes: {injected}, {app_rolls}\n"
                f"{cli_log.read_text()}\n{_pending_event(deployed)}"
            )
            published = read_cluster(deployed.get, LINKERD_NS, KONG_NS, CLIENT_SECRETS)
            checker.observe(datetime.now(UTC), published, on_proof=True)
            roots.update(checker.roots)
            _check_linkerd(deployed, linkerd_check)
            live = deployed.get(f"/apis/apps/v1/namespaces/{APP_NS}/deployments/{APP}")
            rolled = (live["spec"]["template"]["metadata"].get("annotations") or {}).get(
                RESTARTED_AT
            )
            if rolled:
                app_rolls.add(rolled)
            bundle = trust_bundle(kube)
            if APP in _pending_event(deployed) and live_bundle(live) != bundle.strip():
                inject_app(kube, bundle)  # what the injector puts in a new Pod now
                injected.append(len(parse_pem_certificates(bundle)))
            time.sleep(1)
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.wait()
        front.cut()
    output = cli_log.read_text()
    assert cli.returncode == 0, f"{output}\n{deployed.release.pods_detail()}"
    assert "(EMERGENCY)" in output.splitlines()[0], output
    final_roots = _roots(deployed)
    assert len(final_roots) == 1 and final_roots[0] not in old_roots, final_roots
    assert _issuer_root(deployed, roots) == final_roots[0]
    # The workload was rolled by the daemon in each of the three stages, and re-injected
    # by the injector's stand-in with the two-root bundle, then with the new root alone.
    assert len(app_rolls) >= 3, app_rolls
    # (The first may be the new root alone: the workload's template still held the
    # bundle of the scheduled rotation before, now retired.)
    assert 2 in injected and injected[-1] == 1, injected
    assert injected.index(2) < len(injected) - 1, injected
    _check_linkerd(deployed, linkerd_check)
    assert checker.observations > 10


def live_bundle(deployment: dict[str, Any]) -> str:
    """The trust anchors the workload's template injects (what its next Pod holds)."""
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for var in container.get("env") or []:
            if var["name"] == "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS":
                return str(var.get("value", "")).strip()
    return ""


def _observe(
    deployed: Deployed,
    checker: InvariantChecker,
    linkerd_check: LinkerdCheck,
    roots: dict[str, Any],
) -> None:
    """One poll: the invariants over what is published, and Linkerd's verdict on it."""
    published = read_cluster(deployed.get, LINKERD_NS, KONG_NS, CLIENT_SECRETS)
    checker.observe(datetime.now(UTC), published)
    roots.update(checker.roots)
    _check_linkerd(deployed, linkerd_check)


def test_helm_upgrade_adds_a_client_rolling_one_pod_at_a_time(deployed: Deployed) -> None:
    kube = deployed.kube
    before = {p["metadata"]["name"] for p in wait_ready_pods(deployed.release, 2)}
    content = dict(deployed.values)
    content["config"] = {
        **content["config"],
        "kong": {**content["config"]["kong"], "clients": [*CLIENTS, client("inventory")]},
    }
    deployed.release.upgrade(deployed.release.write_values(content, "values-2.yaml"))
    fewest_ready = 2
    most_unready_new = 0
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, deployed.release.pods_detail()
        current = daemon_pods(kube)
        ready = [p for p in current if is_ready(p)]
        fewest_ready = min(fewest_ready, len(ready))
        fresh = [p for p in current if p["metadata"]["name"] not in before]
        most_unready_new = max(most_unready_new, sum(not is_ready(p) for p in fresh))
        if (
            len(current) == 2
            and len(ready) == 2
            and not {p["metadata"]["name"] for p in current} & before
        ):
            break
        time.sleep(0.5)
    assert fewest_ready >= 1, "the PodDisruptionBudget's minAvailable: 1 was not kept"
    assert most_unready_new == 1, "the Pods were not replaced one at a time"
    wait_for(
        "the new client's Secret",
        lambda: deployed.get(f"/api/v1/namespaces/{KONG_NS}/secrets/kong-upstream-inventory"),
        120,
        deployed.release.pods_detail,
    )
    _leader_and_standby(deployed)


def test_helm_uninstall_leaves_the_published_credentials(deployed: Deployed) -> None:
    published = [
        f"/api/v1/namespaces/{LINKERD_NS}/secrets/{ISSUER_SECRET}",
        f"/api/v1/namespaces/{LINKERD_NS}/configmaps/{TRUST_ROOTS}",
        f"/api/v1/namespaces/{KONG_NS}/secrets/kong-upstream-inventory",
        *(f"/api/v1/namespaces/{ns}/secrets/{name}" for ns, name in CLIENT_SECRETS.values()),
    ]
    uids = {p: deployed.get(p)["metadata"]["uid"] for p in published}
    deployed.release.uninstall()
    assert deployed.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{RELEASE}") is None
    wait_for("the daemon Pods gone", lambda: not daemon_pods(deployed.kube), 60)
    listed = deployed.release.run("list", "--output", "json")
    assert RELEASE not in listed.stdout
    # Linkerd and Kong keep what they read: the same objects, untouched.
    assert {p: (deployed.get(p) or {}).get("metadata", {}).get("uid") for p in published} == uids
