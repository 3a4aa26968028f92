"""A namespace set-up in the real kube-apiserver for the daemon to publish into.

``make_cluster`` creates the namespaces, a Service to annotate, the daemon's configuration
and its ServiceAccount bound by the Roles ``ca-daemon config rbac`` prints; ``Cluster``
runs the CLI or an in-process engine as that ServiceAccount and reads objects back.
"""

from __future__ import annotations

import base64
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.report.rbac import manifests
from ca_daemon.rotation.engine import Engine
from ca_daemon.util.kube import api_client
from tests.support.cli import ca_daemon
from tests.support.servers.kube import Kube
from tests.support.servers.tools import unique


@dataclass
class Cluster:
    kube: Kube
    workdir: Path
    config: Path
    kubeconfig: Path  # the daemon's ServiceAccount
    sa_token: str
    linkerd_ns: str
    kong_ns: str
    app_ns: str
    bundle_ns: str

    @property
    def settings(self) -> Settings:
        return load_settings(self.config)

    def run(self, *args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
        return ca_daemon(
            *args,
            "--config",
            str(self.config),
            cwd=self.workdir,
            env={"KUBECONFIG": str(kubeconfig or self.kubeconfig)},
        )

    def get(self, path: str) -> Any:
        return self.kube.get(path)

    def secret(self, ns: str, name: str) -> Any:
        return self.get(f"/api/v1/namespaces/{ns}/secrets/{name}")

    def configmap(self, ns: str, name: str) -> Any:
        return self.get(f"/api/v1/namespaces/{ns}/configmaps/{name}")

    def engine(self, settings: Settings | None = None, token: str | None = None) -> Engine:
        """The daemon in-process, publishing as its ServiceAccount (for multi-pass tests)."""
        settings = settings or self.settings
        anchor, journal = build_anchor_and_journal(settings)
        kubeconfig = self.kube.write_kubeconfig(token or self.sa_token)
        publisher = KubernetesPublisher(settings, api_client(kubeconfig))
        return Engine(settings, anchor, journal, [publisher])


def b64(secret: Any, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def await_rbac(kube: Kube, token: str, path: str, allowed: bool) -> None:
    """RBAC changes reach the authorizer's cache a moment after they are written."""
    deadline = time.monotonic() + 30
    with kube.http(token=token) as http:
        while time.monotonic() < deadline:
            if (http.get(path).status_code != 403) == allowed:
                return
            time.sleep(0.1)
    raise AssertionError(f"RBAC never {'allowed' if allowed else 'refused'} GET {path}")


def make_cluster(kube: Kube, workdir: Path, prefix: str) -> Cluster:
    linkerd_ns, kong_ns, app_ns, bundle_ns, sa_ns = (
        unique(f"{prefix}-{n}") for n in ("linkerd", "kong", "pay", "bundles", "cad")
    )
    for ns in (linkerd_ns, kong_ns, app_ns, bundle_ns, sa_ns):
        kube.create_namespace(ns)
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "payments-api",
                "namespace": app_ns,
                "annotations": {"team": "payments"},
            },
            "spec": {"ports": [{"port": 443}], "selector": {"app": "payments"}},
        }
    )
    config = workdir / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(workdir / "data")}},
                "publish": {"kubernetes": {"enabled": True}},
                "linkerd": {"namespace": linkerd_ns},
                "kong": {
                    "namespace": kong_ns,
                    "clients": [
                        {
                            "name": "payments",
                            "common_name": "kong.payments.upstream",
                            "dns_names": ["kong.kong.svc.cluster.local"],
                            "secret": "kong-upstream-payments",
                            "service": f"{app_ns}/payments-api",
                        },
                        {"name": "orders", "common_name": "kong.orders.upstream"},
                    ],
                },
                "bundles": [{"namespace": bundle_ns, "configmap": "upstream-trust"}],
            }
        )
    )
    kube.create_service_account(sa_ns, "ca-daemon")
    for doc in manifests(load_settings(config), sa_ns, "ca-daemon"):
        kube.apply(doc)
    token = kube.service_account_token(sa_ns, "ca-daemon")
    kubeconfig = kube.write_kubeconfig(token, workdir / "sa.kubeconfig")
    for path in (
        f"/api/v1/namespaces/{linkerd_ns}/configmaps/linkerd-identity-trust-roots",
        f"/api/v1/namespaces/{app_ns}/secrets/kong-upstream-payments",
        f"/api/v1/namespaces/{kong_ns}/secrets",
        f"/api/v1/namespaces/{bundle_ns}/configmaps/upstream-trust",
    ):
        await_rbac(kube, token, path, allowed=True)
    return Cluster(kube, workdir, config, kubeconfig, token, linkerd_ns, kong_ns, app_ns, bundle_ns)


def published_cluster(kube: Kube, workdir: Path, prefix: str) -> Cluster:
    """make_cluster, then a first `run --once` that publishes everything."""
    c = make_cluster(kube, workdir, prefix)
    first = c.run("run", "--once")
    assert first.returncode == 0, first.stdout + first.stderr
    return c
