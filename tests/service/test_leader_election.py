"""Two ``ca-daemon run`` replicas on the real kube-apiserver, one Lease between them.

Both publish to Kubernetes as the ServiceAccount ``config rbac`` binds (its Lease rule
included), with the Vault anchor on real OpenBao (mounts and journal unique to the
test), so they share one journal the way two Pods of the chart do. Short, real
durations: a 4s lease (3s renew deadline, 1s retry), a pass every second, 20-second
issuer and client certificates, a 3-second propagation delay.

The replicas share a host name (as on the host network) and differ in ``POD_NAME``, as
the chart sets it: the Lease's holder names the Pod.

1. Exactly one leads (the Lease's holder; ``ca_daemon_leader`` 1 there, 0 on the other);
   both are ready. A manual root rotation is asked of the *standby* (a Service routes to
   either): it answers 202, journals it, serves ``GET /v1/operations/{id}`` and issues
   nothing; the leader carries it out at its next pass. The leader is killed with
   SIGKILL while ``propagating``; the standby takes the Lease within ``lease_duration``
   + one check and completes the rotation. The SPEC's invariants are checked on the
   cluster at every poll, and no extra root is made.
2. A deposed leader: SIGSTOP the leader past its lease; the standby takes over and
   renews; SIGCONT the old one: it sees it lost the Lease, acts no more (its issuance
   counters stand still, it reports ``ca_daemon_leader`` 0), and what the new leader
   published never goes back (certificates and ``ca-daemon.io/generation``). A request
   asked of the deposed one is carried out by the new leader, never by it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ca_daemon.config.loading import load_settings
from ca_daemon.journal.journal import Journal
from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.model.state import CaRecord, OpState, Phase
from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.report.rbac import manifests
from tests.support.cli import daemon_env
from tests.support.cluster_rotation import (
    VAULT_BACKDATE,
    RotationCluster,
    VaultAdmin,
    make_rotation_cluster,
)
from tests.support.invariants import InvariantChecker
from tests.support.kube_cluster import await_rbac
from tests.support.servers.kube import Kube
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import ServerProcess, log_tail, unique

pytestmark = pytest.mark.integration

LEASE_DURATION = 4.0
RENEW_DEADLINE = 3.0
RETRY_PERIOD = 1.0
CHECK_INTERVAL = 1.0
PROPAGATION = timedelta(seconds=3)
# Polled snapshots see a bundle a little after it was written, and X.509 times are whole
# seconds: the checker allows that much less than the configured delay.
TOLERANCE = timedelta(seconds=1.5)
TIMEOUT = 90.0
GENERATION = "ca-daemon.io/generation"
# A published object as seen: its certificate's fingerprint and its generation annotation.
Seen = tuple[str, tuple[int, ...] | None]


@dataclass
class Replica:
    name: str
    url: str
    log: Path
    argv: list[str]
    env: dict[str, str]
    process: ServerProcess | None = None

    def start(self) -> None:
        self.process = ServerProcess(
            self.name, self.argv, log_path=self.log, env=self.env, cwd=self.log.parent
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.proc.pid

    def alive(self) -> None:
        assert self.process is not None
        assert self.process.proc.poll() is None, f"{self.name} exited:\n{log_tail(self.log)}"

    def metrics(self) -> dict[str, float]:
        """The served /metrics as {series: value} (None when the API does not answer)."""
        response = httpx.get(f"{self.url}/metrics", timeout=5)
        response.raise_for_status()
        out: dict[str, float] = {}
        for line in response.text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                out[series] = float(value)
        return out

    def leader_gauge(self) -> float | None:
        try:
            return self.metrics().get("ca_daemon_leader")
        except httpx.HTTPError:
            return None

    def issued(self) -> float:
        """Issuances this process made (ca_daemon_rotations_total, every label)."""
        return sum(
            v for k, v in self.metrics().items() if k.startswith("ca_daemon_rotations_total")
        )

    def kill(self, sig: signal.Signals) -> None:
        self.alive()
        os.kill(self.pid, sig)

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.process.stop()


@dataclass
class Pair:
    cluster: RotationCluster
    lease_ns: str
    lease: str
    journal: Journal
    token: str
    replicas: list[Replica]
    checker: InvariantChecker
    observations: int = 0
    phases: list[Phase] = field(default_factory=list)

    def lease_spec(self) -> dict[str, Any]:
        obj = self.cluster.get(
            f"/apis/coordination.k8s.io/v1/namespaces/{self.lease_ns}/leases/{self.lease}"
        )
        return dict(obj["spec"]) if obj else {}

    def observe(self) -> None:
        """Check the SPEC's invariants on what the cluster shows now."""
        c = self.cluster
        trust = f"/api/v1/namespaces/{c.linkerd_ns}/configmaps/linkerd-identity-trust-roots"
        if c.secret(c.linkerd_ns, "linkerd-identity-issuer") is None or c.get(trust) is None:
            return  # the first publish is not complete yet (objects are written in parallel)
        self.checker.observe(datetime.now(UTC), self.cluster.read_cluster())
        self.observations += 1

    def record(self) -> CaRecord:
        record, _ = self.journal.load_ca()
        if not self.phases or self.phases[-1] is not record.phase:
            self.phases.append(record.phase)
        return record

    def until(self, what: str, done: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.observe()
            if done():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {r.name}\n{log_tail(r.log)}" for r in self.replicas)
        raise AssertionError(f"not {what} after {timeout}s (phases {self.phases}):\n{logs}")

    def leader(self) -> tuple[Replica, Replica]:
        """(leader, standby) once exactly one says it leads and the Lease names a holder."""
        found: list[tuple[Replica, Replica]] = []

        def one() -> bool:
            gauges = [r.leader_gauge() for r in self.replicas]
            if sorted(g for g in gauges if g is not None) != [0.0, 1.0] or len(gauges) != 2:
                return False
            if not self.lease_spec().get("holderIdentity"):
                return False
            a, b = self.replicas
            found[:] = [(a, b) if gauges[0] == 1.0 else (b, a)]
            return True

        self.until("one leader", one)
        return found[0]

    def rotate(self, replica: Replica, target: str, reason: str) -> httpx.Response:
        return httpx.post(
            f"{replica.url}/v1/rotate",
            json={"target": target, "reason": reason},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )

    def operation(self, replica: Replica, op_id: str) -> httpx.Response:
        return httpx.get(
            f"{replica.url}/v1/operations/{op_id}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )

    def status(self, replica: Replica) -> dict[str, Any]:
        response = httpx.get(
            f"{replica.url}/v1/status",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        response.raise_for_status()
        view: dict[str, Any] = response.json()
        return view

    def published(self) -> dict[str, Seen]:
        """Each published object: (fingerprint of its first certificate, generation)."""
        c = self.cluster
        objects = {
            "issuer": (c.linkerd_ns, "linkerd-identity-issuer"),
            **{f"client {n}": where for n, where in c.clients.items()},
        }
        out: dict[str, Seen] = {}
        for name, (ns, secret_name) in objects.items():
            secret = c.secret(ns, secret_name)
            if secret is None:
                continue
            cert = parse_pem_certificates(base64.b64decode(secret["data"]["tls.crt"]))[0]
            annotation = (secret["metadata"].get("annotations") or {}).get(GENERATION)
            generation = tuple(int(n) for n in annotation.split(".")) if annotation else None
            out[name] = (fingerprint(cert), generation)  # (journal version, credential's)
        return out


@pytest.fixture
def pair(kube: Kube, openbao: OpenBao, tmp_path: Path) -> Iterator[Pair]:
    cluster = make_rotation_cluster(
        kube, VaultAdmin(openbao.address, openbao.token), tmp_path, "le"
    )
    sa_ns = cluster.sa_namespace
    lease = unique("cad-leader")
    renewal = {"lifetime": "20s", "rotate_before": "8s"}
    doc = yaml.safe_load(cluster.config.read_text())
    doc["linkerd"] |= {"gate": "time", "restart": "none", "issuer": renewal}
    doc["root"] = {"lifetime": "2h", "rotate_before": "1h"}
    doc["kong"]["intermediate"] = {"lifetime": "1h", "rotate_before": "20m"}
    for client in doc["kong"]["clients"]:
        client |= renewal
    doc["rotation"] = {
        "check_interval": f"{int(CHECK_INTERVAL)}s",
        "propagation_delay": f"{int(PROPAGATION.total_seconds())}s",
        "clock_skew": "1s",
        "retire_delay": "auto",
    }
    doc["leader_election"] = {
        "namespace": sa_ns,
        "lease": lease,
        "lease_duration": f"{int(LEASE_DURATION)}s",
        "renew_deadline": f"{int(RENEW_DEADLINE)}s",
        "retry_period": f"{int(RETRY_PERIOD)}s",
    }
    doc["server"] = {"token_file": str(tmp_path / "api-token")}
    cluster.config.write_text(yaml.safe_dump(doc))
    settings = load_settings(cluster.config)
    assert settings.leader_election.enabled is None  # on by default: Kubernetes publishing
    for manifest in manifests(settings, sa_ns, "ca-daemon"):
        kube.apply(manifest)
    lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{sa_ns}/leases/{lease}"
    await_rbac(kube, cluster.token, lease_path, allowed=True)
    token = "test-" + unique("token")
    (tmp_path / "api-token").write_text(token + "\n")
    (tmp_path / "api-token").chmod(0o600)
    kubeconfig = kube.write_kubeconfig(cluster.token, tmp_path / "sa.kubeconfig")
    replicas = []
    for name in ("a", "b"):
        env = daemon_env(
            {"KUBECONFIG": str(kubeconfig), "HOSTNAME": "node-1", "POD_NAME": f"ca-daemon-{name}"}
        )
        url = "http://" + env["CA_DAEMON_SERVER__ADDRESS"]
        argv = [sys.executable, "-m", "ca_daemon", "run", "--config", str(cluster.config)]
        replicas.append(Replica(f"ca-daemon-{name}", url, tmp_path / f"{name}.log", argv, env))
    _, journal = build_anchor_and_journal(settings, create=False)
    checker = InvariantChecker(PROPAGATION - TOLERANCE, VAULT_BACKDATE)
    p = Pair(cluster, sa_ns, lease, journal, token, replicas, checker)
    for replica in replicas:
        replica.start()
    try:
        yield p
    finally:
        for replica in replicas:
            replica.stop()


def _bootstrapped(p: Pair) -> bool:
    try:
        record = p.record()
    except Exception:
        return False
    return record.active_intermediate is not None and len(p.published()) == 3


def test_kill_9_of_the_leader_mid_rotation_the_standby_takes_over_and_completes_it(
    pair: Pair,
) -> None:
    p = pair
    p.until("bootstrapped", lambda: _bootstrapped(p))
    leader, standby = p.leader()
    spec = p.lease_spec()
    holder = spec["holderIdentity"]
    assert holder.startswith(f"{leader.name}_"), (holder, leader.name)
    assert spec["leaseDurationSeconds"] == int(LEASE_DURATION)
    assert p.status(leader)["leader"] == "self"
    # The standby learns the holder at its next look at the Lease (retry_period): on a
    # loaded machine that can come after the leader's first pass.
    p.until("the standby naming the leader", lambda: p.status(standby)["leader"] == holder)
    old_root = p.record().active_root
    assert old_root is not None
    # Both Ready: the standby serves status and requests.
    for replica in (leader, standby):
        ready = httpx.get(f"{replica.url}/readyz", timeout=5)
        assert ready.status_code == 200, (replica.name, ready.text)

    # Asked of the standby: journaled there (202), carried out by the leader.
    accepted = p.rotate(standby, "trust-anchor", "failover drill, via the standby")
    assert accepted.status_code == 202, accepted.text
    operation = accepted.json()["operation"]
    asked = p.record().operation(operation)
    assert asked is not None and asked.reason == "failover drill, via the standby"
    seen = p.operation(standby, operation)
    assert seen.status_code == 200, seen.text
    assert seen.json()["target"] == "trust-anchor"
    # The same target asked of the leader is the same operation.
    again = p.rotate(leader, "trust-anchor", "failover drill")
    assert again.status_code == 202 and again.json()["operation"] == operation
    p.until("propagating", lambda: p.record().phase is Phase.PROPAGATING)
    assert standby.issued() == 0, "the standby ran the engine"
    on_standby = p.operation(standby, operation).json()
    assert on_standby["state"] == "running" and on_standby["phase"] != "steady", on_standby
    transitions = p.lease_spec().get("leaseTransitions", 0)

    leader.kill(signal.SIGKILL)
    killed = time.monotonic()
    assert leader.process is not None and leader.process.proc.wait(10) == -signal.SIGKILL
    took_over: list[float] = []

    def new_leader() -> bool:
        standby.alive()
        now = p.lease_spec()
        if now.get("holderIdentity", "").startswith(f"{standby.name}_"):
            if not took_over:
                took_over.append(time.monotonic() - killed)
            return standby.leader_gauge() == 1.0
        return False

    p.until("taken over", new_leader, timeout=30)
    # Expired a lease_duration (of the standby's clock) after the standby saw the last
    # renewal, itself up to a retry after it was written; taken at the next retry.
    assert took_over[0] <= LEASE_DURATION + RETRY_PERIOD + CHECK_INTERVAL + 1.0, took_over
    assert p.lease_spec()["leaseTransitions"] == transitions + 1

    def rotated() -> bool:
        standby.alive()
        record = p.record()
        op = record.operation(operation)
        bundle = parse_pem_certificates(p.cluster.bundle_pem())
        return (
            record.phase is Phase.STEADY
            and len(record.roots) == 1
            and record.roots[0].ref != old_root.ref
            and op is not None
            and not op.open
            and [fingerprint(c) for c in bundle] == [fingerprint(record.roots[0].cert)]
        )

    p.until("rotated by the new leader", rotated)
    final = p.record()
    op = final.operation(operation)
    assert op is not None and op.state is OpState.SUCCEEDED, op
    assert {Phase.PROPAGATING, Phase.STEADY} <= set(p.phases), p.phases
    (root,) = final.roots
    # No extra root: the old one and the one the rotation made, nothing else.
    assert p.cluster.vault.issuer_names(p.cluster.root_mount) == sorted([old_root.ref, root.ref])
    assert standby.issued() > 0  # the new leader did the rest
    assert p.observations > 20 and p.checker.observations == p.observations


def test_a_deposed_leader_resumed_after_its_lease_does_not_overwrite_the_new_leader(
    pair: Pair,
) -> None:
    p = pair
    p.until("bootstrapped", lambda: _bootstrapped(p))
    old, new = p.leader()
    # Paused just before a client's renewal falls due, so it may be stopped mid-pass.
    secret = p.cluster.secret(*p.cluster.clients["orders"])
    cert = parse_pem_certificates(base64.b64decode(secret["data"]["tls.crt"]))[0]
    due = cert.not_valid_after_utc - timedelta(seconds=8)
    time.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds() - 0.1))
    before = p.published()
    old.kill(signal.SIGSTOP)
    try:
        p.until(
            "the standby leads",
            lambda: (
                p.lease_spec().get("holderIdentity", "").startswith(f"{new.name}_")
                and new.leader_gauge() == 1.0
            ),
            timeout=30,
        )
        holder = p.lease_spec()["holderIdentity"]
        # The new leader publishes: every certificate renewed past what the old one saw.
        p.until(
            "renewed by the new leader",
            lambda: all(p.published()[k][0] != before[k][0] for k in before),
            timeout=40,
        )
    finally:
        old.kill(signal.SIGCONT)
    history: dict[str, list[tuple[str, tuple[int, ...] | None]]] = {
        k: [v] for k, v in p.published().items()
    }
    # Resumed, it may finish the pass it was stopped in (the fences keep that from
    # publishing); then it notices the Lease is gone and stands by.
    p.until("the old leader standing by", lambda: old.leader_gauge() == 0.0, timeout=10)
    time.sleep(RENEW_DEADLINE)
    old_issued = old.issued()
    renewed_by_new = new.issued()

    def settled() -> bool:
        for name, now in p.published().items():
            seen = history[name]
            if now != seen[-1]:
                assert now not in seen, f"{name} went back to {now} (seen {seen})"
                gens = [g for _, g in (*seen, now) if g is not None]
                assert gens == sorted(gens), f"{name}: generation went back: {gens}"
                seen.append(now)
        return False

    # Two renewal periods after the old leader resumed.
    with pytest.raises(AssertionError, match="not watched"):
        p.until("watched", settled, timeout=25)
    old.alive()
    assert old.leader_gauge() == 0.0
    assert old.issued() == old_issued, "the deposed leader issued after it resumed"
    assert p.status(old)["leader"] == holder
    assert p.lease_spec()["holderIdentity"] == holder  # never taken back
    assert new.issued() > renewed_by_new  # the new leader kept renewing meanwhile
    assert any(len(seen) > 1 for seen in history.values()), history
    # Asked of the deposed replica: journaled, and carried out by the new leader alone.
    accepted = p.rotate(old, "linkerd-issuer", "asked of the deposed one")
    assert accepted.status_code == 202, accepted.text
    op_id = accepted.json()["operation"]

    def carried_out() -> bool:
        op = p.record().operation(op_id)
        return op is not None and op.state is OpState.SUCCEEDED

    p.until("the request carried out by the new leader", carried_out, timeout=30)
    assert p.operation(old, op_id).json()["state"] == "succeeded"
    assert old.issued() == old_issued, "the deposed leader issued"
    assert "lost leadership" in old.log.read_text() or "standing by" in old.log.read_text()
    assert p.observations > 20
