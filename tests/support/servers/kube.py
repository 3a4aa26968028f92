"""A real Kubernetes API server (plus etcd) on loopback, started like controller-runtime's envtest.

There is no controller-manager: no garbage collector, no token controller, no `default`
ServiceAccount. Namespaces and ServiceAccounts must be created explicitly (helpers below);
TokenRequest works with the API server alone.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.pki import issue, make_ca, rsa_key_pem
from tests.support.servers.tools import ServerProcess, free_port, require_tool, running

# Plural resource names for apply(); the API server needs the plural in the URL.
_PLURALS = {
    "Namespace": "namespaces",
    "ServiceAccount": "serviceaccounts",
    "Secret": "secrets",
    "ConfigMap": "configmaps",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Pod": "pods",
    "Deployment": "deployments",
    "Lease": "leases",
}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


def resource_path(obj: dict[str, Any]) -> str:
    """REST path of `obj` (apiVersion/kind/metadata), e.g. /api/v1/namespaces/x/secrets/y."""
    api_version: str = obj["apiVersion"]
    kind: str = obj["kind"]
    meta = obj["metadata"]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    plural = _PLURALS.get(kind, kind.lower() + "s")
    if kind in _CLUSTER_SCOPED:
        return f"{prefix}/{plural}/{meta['name']}"
    return f"{prefix}/namespaces/{meta['namespace']}/{plural}/{meta['name']}"


@dataclass(frozen=True)
class Kube:
    """Handle on the running API server; `admin_*` has system:masters (bypasses RBAC)."""

    server: str  # https://127.0.0.1:PORT
    ca_file: Path  # CA of the API server's serving certificate
    admin_token: str
    admin_kubeconfig: Path
    workdir: Path
    # own_kube's process, for tests that stop the apiserver itself and start it again.
    apiserver: Apiserver | None = field(default=None, compare=False, repr=False)

    def http(self, token: str | None = None) -> httpx.Client:
        """httpx client authenticated with `token` (default: admin); use as a context manager."""
        return httpx.Client(
            base_url=self.server,
            verify=ssl.create_default_context(cafile=str(self.ca_file)),
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
            timeout=30,
        )

    def write_kubeconfig(self, token: str, path: Path | None = None) -> Path:
        """Write a kubeconfig that authenticates with `token`; returns its path."""
        if path is None:
            path = self.workdir / f"kubeconfig-{secrets.token_hex(4)}.yaml"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def api_client(self, token: str | None = None) -> Any:
        """An official `kubernetes` ApiClient for `token` (default: admin)."""
        from kubernetes import config

        kubeconfig = self.write_kubeconfig(token) if token else self.admin_kubeconfig
        return config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig)
        )

    def get(self, path: str) -> Any:
        """The parsed object (or list) at API ``path`` as admin; None when it is absent."""
        with self.http() as http:
            response = http.get(path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of one object (any kind in _PLURALS); returns the stored object."""
        with self.http() as http:
            response = http.patch(
                resource_path(obj),
                params={"fieldManager": "ca-daemon-tests", "force": "true"},
                content=json.dumps(obj),  # JSON is YAML, which apply-patch+yaml accepts
                headers={"Content-Type": "application/apply-patch+yaml"},
            )
        if response.is_error:  # the apiserver's reason, e.g. which field it refused
            raise AssertionError(f"apply {resource_path(obj)}: {response.text}")
        result: dict[str, Any] = response.json()
        return result

    def create_namespace(self, name: str) -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def create_service_account(self, namespace: str, name: str) -> None:
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"namespace": namespace, "name": name},
            }
        )

    def bind_cluster_role(self, name: str, role: str, namespace: str, service_account: str) -> None:
        """ClusterRoleBinding ``name``: ClusterRole ``role`` to that ServiceAccount."""
        self.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": role,
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
                ],
            }
        )

    def service_account_token(
        self,
        namespace: str,
        name: str,
        expiration_seconds: int = 600,
        audiences: list[str] | None = None,
    ) -> str:
        """Mint a short-lived token via the TokenRequest API (the minimum lifetime is 600s)."""
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = audiences
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        with self.http() as http:
            response = http.post(
                f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", json=body
            )
        response.raise_for_status()
        token: str = response.json()["status"]["token"]
        return token


def _start_etcd(etcd: str, workdir: Path) -> tuple[ServerProcess, str]:
    client_port, peer_port = free_port(), free_port()
    client_url = f"http://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    server = ServerProcess(
        "etcd",
        [
            etcd,
            "--name=test",
            f"--data-dir={workdir / 'etcd-data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}",
            "--unsafe-no-fsync",  # throwaway data; fsync only slows the tests
            "--log-level=warn",
        ],
        log_path=workdir / "etcd.log",
    )
    server.wait_ready(lambda: httpx.get(f"{client_url}/health").json()["health"] == "true")
    return server, client_url


@contextmanager
def own_kube(
    workdir: Path,
    etcd: str,
    apiserver: str,
    address: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    controller_manager: bool = False,
) -> Iterator[Kube]:
    """etcd and a kube-apiserver of their own in ``workdir``, started like envtest; for
    the session fixture below, for bench/ (which runs without pytest) and for the node
    (servers/node.py), which serves it on ``address`` with ``extra_args`` and runs a
    ``controller_manager`` beside it."""
    # Our own serving cert, so clients get a CA file and a cert valid for the address.
    ca = make_ca("kube-apiserver test CA")
    ips = tuple(dict.fromkeys((address, "127.0.0.1")))
    serving = issue(ca, "kube-apiserver", server=True, dns_names=("localhost",), ips=ips)
    ca_file, _ = ca.write(workdir, "ca")
    serving_crt, serving_key = serving.write(workdir, "serving")
    sa_key = workdir / "sa.key"
    sa_key.write_bytes(rsa_key_pem())
    admin_token = secrets.token_hex(24)
    tokens = workdir / "tokens.csv"
    tokens.write_text(f'{admin_token},admin,admin-uid,"system:masters"\n')

    port = free_port()
    server_url = f"https://{address}:{port}"
    etcd_server, etcd_url = _start_etcd(etcd, workdir)
    with running(etcd_server):
        argv = [
            apiserver,
            f"--etcd-servers={etcd_url}",
            f"--secure-port={port}",
            f"--bind-address={address}",
            f"--advertise-address={address}",
            f"--cert-dir={workdir / 'certs'}",
            f"--tls-cert-file={serving_crt}",
            f"--tls-private-key-file={serving_key}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={tokens}",
            f"--service-account-issuer={server_url}",
            f"--service-account-key-file={sa_key}",
            f"--service-account-signing-key-file={sa_key}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            # As envtest: the ServiceAccount admission plugin wants a `default` SA that
            # only the controller-manager creates, absent but on the node.
            *([] if controller_manager else ["--disable-admission-plugins=ServiceAccount"]),
            *extra_args,
        ]
        process = Apiserver(argv, workdir / "kube-apiserver.log")
        kube = Kube(
            server=server_url,
            ca_file=ca_file,
            admin_token=admin_token,
            admin_kubeconfig=workdir / "admin.kubeconfig",
            workdir=workdir,
            apiserver=process,
        )
        kube.write_kubeconfig(admin_token, kube.admin_kubeconfig)
        process.ready = lambda: _ready(kube)
        process.start()
        try:
            yield kube
        finally:
            process.stop()


def _ready(kube: Kube) -> bool:
    with kube.http() as http:
        return http.get("/readyz").status_code == 200


class Apiserver:
    """own_kube's kube-apiserver: killed and started again on the same etcd, port, certs
    and tokens, as a control-plane node that crashed and came back."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.ready: Callable[[], bool] = lambda: True
        self.process: ServerProcess | None = None

    def start(self) -> None:
        self.process = ServerProcess("kube-apiserver", self.argv, log_path=self.log_path)
        # /readyz turns 200 once RBAC bootstrap roles and the other post-start hooks ran.
        self.process.wait_ready(self.ready, timeout=120)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, connections dropped, as when the node dies."""
        assert self.process is not None
        os.killpg(self.process.proc.pid, signal.SIGKILL)
        self.process.proc.wait()
        self.stop()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    etcd = require_tool("etcd")
    apiserver = require_tool("kube-apiserver")
    with own_kube(tmp_path_factory.mktemp("kube"), etcd, apiserver) as server:
        yield server


@pytest.fixture(scope="module")
def kube_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """A second kube-apiserver (and etcd) for the module: a linked cluster
    (tests/support/multicluster.py)."""
    etcd = require_tool("etcd")
    apiserver = require_tool("kube-apiserver")
    with own_kube(tmp_path_factory.mktemp("kube-east"), etcd, apiserver) as server:
        yield server


# --- what the apiserver served (its own count) ---------------------------------------------

READS = {"GET", "LIST"}
WRITES = {"POST", "PUT", "PATCH", "DELETE", "APPLY"}
# What the daemon reads and writes; the apiserver's own traffic (leases, endpoints) is not.
DAEMON_RESOURCES = {"secrets", "configmaps", "services"}


def api_requests(kube: Kube, resources: set[str] = DAEMON_RESOURCES) -> Counter[tuple[str, str]]:
    """(verb, resource) -> requests served so far, from the apiserver's own
    apiserver_request_total."""
    with kube.http() as http:
        response = http.get("/metrics")
    response.raise_for_status()
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(response.text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "apiserver_request_total" and labels["resource"] in resources:
                counts[labels["verb"], labels["resource"]] += int(sample.value)
    return counts


def total(counts: Counter[tuple[str, str]], verbs: set[str]) -> int:
    return sum(n for (verb, _), n in counts.items() if verb in verbs)
