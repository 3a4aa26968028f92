"""The single-node cluster the chart tests run on (tests/support/servers/node.py) really
runs Pods: scheduled, started by containerd and runc, on the node's bridge network,
reachable from the host, with a projected ServiceAccount token and a non-root user."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests.support.chart_deployment import is_ready
from tests.support.servers.images import BUSYBOX_IMAGE
from tests.support.servers.node import HOST_IP, SUBNET, Node, wait_for

pytestmark = pytest.mark.integration


def _pod(name: str) -> dict[str, Any]:
    # Serves one line on :7000 (nc -lk) so the host can reach it at the Pod's IP.
    script = "trap 'exit 0' TERM; id -u > /tmp/uid; while true; do nc -l -p 7000 < /tmp/uid; done"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "node-smoke", "name": name},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": 10001, "runAsNonRoot": True},
            "containers": [
                {
                    "name": "main",
                    "image": BUSYBOX_IMAGE,
                    "command": ["sh", "-c", script],
                    "readinessProbe": {"tcpSocket": {"port": 7000}, "periodSeconds": 1},
                    "volumeMounts": [{"name": "token", "mountPath": "/token"}],
                }
            ],
            "volumes": [
                {
                    "name": "token",
                    "projected": {
                        "sources": [{"serviceAccountToken": {"path": "token", "audience": "vault"}}]
                    },
                }
            ],
        },
    }


def test_a_pod_runs_on_the_node_and_the_host_reaches_it(node: Node) -> None:
    kube = node.kube
    kube.create_namespace("node-smoke")
    wait_for(
        "the default ServiceAccount (the controller-manager makes it)",
        lambda: kube.get("/api/v1/namespaces/node-smoke/serviceaccounts/default") is not None,
        60,
    )
    kube.apply(_pod("echo"))
    path = "/api/v1/namespaces/node-smoke/pods/echo"
    wait_for(
        "the Pod Ready",
        lambda: is_ready(kube.get(path)),
        120,
        lambda: f"{kube.get(path)}\n{node.pod_logs('node-smoke', 'echo')}",
    )
    pod = kube.get(path)
    assert pod["spec"]["nodeName"] == "127.0.0.1"
    ip = pod["status"]["podIP"]
    prefix = SUBNET.rsplit(".", 1)[0]
    assert ip.startswith(prefix + ".") and ip != HOST_IP, ip
    with socket.create_connection((ip, 7000), timeout=5) as conn:
        assert conn.recv(64).strip() == b"10001"
    with kube.http() as http:
        assert http.delete(path).status_code == 200
    wait_for("the Pod gone", lambda: kube.get(path) is None, 60)
