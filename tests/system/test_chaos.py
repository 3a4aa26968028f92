"""One daemon through two root rotations under a loop of random real faults.

``python -m ca_daemon run`` is a process of its own, on servers of its own: OpenBao on raft
storage (the anchor and the journal), an etcd and a kube-apiserver that can be killed
(Kubernetes publishing, the Lease, the Linkerd roll), and the data and publish directories
on a small tmpfs that can be filled. Certificates live 90 seconds and are renewed with 60
left; the propagation delay is 10 seconds; so both rotations retire within the test.

The faults come one after another, drawn from a shuffled bag (seed ``CA_DAEMON_CHAOS_SEED``,
fixed by default so a failure can be replayed), each for a few seconds with calm between:

- ``kill-9``: SIGKILL the daemon; it is started again on the same data at once, as the
  kubelet restarts a container (the test plays that part throughout: a daemon that exits
  on its own is started again too);
- ``vault-stopped``: OpenBao SIGKILLed, restarted on its raft storage and unsealed;
- ``apiserver-stopped``: the kube-apiserver SIGKILLed, started again on the same etcd;
- ``connection-flood``: hundreds of idle TCP connections held against the daemon's API;
- ``disk-full``: the tmpfs holding the data directory and the published files filled up.

At every poll, what verifiers see (the published directory and the cluster's objects,
read at one moment) is checked against the SPEC's three root-rotation invariants
(tests/support/invariants.py); when the daemon rolls Linkerd's control plane, its Pods are
re-created as the Deployment controller would (no kubelet here). At the end nothing is
lost: both rotations succeeded with exactly one new root each, the journal agrees with the
anchor, Linkerd's own validation accepts the published issuer in both places, the log
holds no key and stayed small.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
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
from ca_daemon.config.settings import Settings
from ca_daemon.journal.journal import Journal
from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.model.state import CaRecord, OpState, Phase
from ca_daemon.report.verify import verify_directory
from tests.support.cli import daemon_env
from tests.support.cluster_rotation import (
    HOUR,
    VAULT_BACKDATE,
    Mesh,
    RotationCluster,
    VaultAdmin,
    make_rotation_cluster,
    wall_clock,
)
from tests.support.fault_kinds import RaftOpenBao, write_token_file
from tests.support.identity_controller import DEPLOYMENT
from tests.support.invariants import InvariantChecker, Published, read_directory
from tests.support.linkerd_identity import IdentityStandIn
from tests.support.servers.kube import Apiserver, Kube, own_kube
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.tools import ServerProcess, free_port, log_tail, require_tool

pytestmark = pytest.mark.integration

KINDS = ("kill-9", "vault-stopped", "apiserver-stopped", "connection-flood", "disk-full")
SEED = int(os.environ.get("CA_DAEMON_CHAOS_SEED", "20261206"))
PROPAGATION = timedelta(seconds=10)
# A bundle first seen everywhere is dated from when the snapshot before began to be read
# (it got there after that); X.509 times have whole seconds, and Vault's backdating is
# judged to the second: the checker allows a little less than the delay.
TOLERANCE = timedelta(seconds=2)
POLL = 0.25
DEADLINE = 900.0  # two rotations take about four minutes with the faults
FLOOD = 300  # idle connections, well above the API server's cap of 64
TMPFS_SIZE = "16m"
LOG_LIMIT = 20 * 1024 * 1024


# --- the daemon, restarted as a kubelet would ---------------------------------------------------


@dataclass
class Supervisor:
    config: Path
    env: dict[str, str]
    log: Path
    process: ServerProcess | None = None
    kills: int = 0
    starts: int = 0
    exits: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _start(self) -> None:
        self.process = ServerProcess(
            "ca-daemon run",
            [sys.executable, "-m", "ca_daemon", "run", "--config", str(self.config)],
            log_path=self.log,
            env=self.env,
            cwd=self.config.parent,
        )
        self.starts += 1

    def keep_running(self) -> None:
        """Start the daemon when it is not running: the first time, or after it exited."""
        with self.lock:
            if self.process is not None and self.process.proc.poll() is not None:
                self.exits.append(self.process.proc.returncode)
                self.process.stop()
                self.process = None
            if self.process is None:
                self._start()

    def kill9(self) -> None:
        with self.lock:
            if self.process is None or self.process.proc.poll() is not None:
                return
            os.killpg(self.process.proc.pid, signal.SIGKILL)
            self.process.proc.wait(10)
            self.process.stop()
            self.process = None
            self.kills += 1
            self._start()

    def stop(self) -> None:
        with self.lock:
            if self.process is not None:
                self.process.stop()
                self.process = None


# --- the faults ---------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    """A small filesystem of its own, so filling it fills nothing else; removed after."""
    path.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write until the filesystem says ENOSPC, down to its last block."""
    filler = disk / "filler"
    size = 1 << 20
    with filler.open("wb", buffering=0) as f:
        while size >= 512:
            try:
                f.write(b"\0" * size)
            except OSError:
                size //= 2
    return filler


@dataclass
class Chaos:
    """Runs the faults in a thread until stopped; notes what it did and when."""

    supervisor: Supervisor
    bao: RaftOpenBao
    apiserver: Apiserver
    disk: Path
    api_port: int
    phase: Callable[[], Phase | None]
    rng: random.Random
    done: list[tuple[str, Phase | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    chosen: str | None = None  # the next fault's kind, when the test picked it
    active: str | None = None  # the fault in force now
    thread: threading.Thread | None = None

    def _inject(self, kind: str) -> Callable[[], None]:
        """Make the fault; return what undoes it."""
        match kind:
            case "kill-9":
                self.supervisor.kill9()  # and started again at once
                return lambda: None
            case "vault-stopped":
                self.bao.kill()

                def heal_vault() -> None:
                    self.bao.start()
                    self.bao.unseal()

                return heal_vault
            case "apiserver-stopped":
                self.apiserver.kill()
                return self.apiserver.start
            case "connection-flood":
                conns = []
                for _ in range(FLOOD):
                    with contextlib.suppress(OSError):
                        conns.append(socket.create_connection(("127.0.0.1", self.api_port), 2))

                def close() -> None:
                    for c in conns:
                        c.close()

                return close
            case _:
                return fill(self.disk).unlink

    def one(self, kind: str) -> None:
        self.done.append((kind, self.phase()))
        heal = self._inject(kind)
        self.active = kind
        try:
            time.sleep(self.rng.uniform(2, 6))
        finally:
            self.active = None
            heal()

    def _loop(self) -> None:
        bag: list[str] = []
        while True:
            self.wake.wait(self.rng.uniform(3, 6))
            self.wake.clear()
            if self.stopping.is_set():
                return
            if not bag:
                bag = list(KINDS)
                self.rng.shuffle(bag)
            kind, self.chosen = self.chosen or bag.pop(), None
            try:
                self.one(kind)
            except Exception as exc:  # a fault that could not be made or undone
                self.errors.append(f"{self.done[-1][0]}: {exc!r}")
                return

    def nudge(self, kind: str | None = None) -> None:
        """The next fault now (of ``kind``, if given): a rotation's short moments would
        mostly fall between faults."""
        self.chosen = kind or self.chosen
        self.wake.set()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="chaos", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(180)


# --- what the test watches ----------------------------------------------------------------------


@dataclass
class Watch:
    cluster: RotationCluster
    journal: Journal  # read-only, beside the daemon
    out: Path
    mesh: Mesh
    identity: IdentityStandIn
    supervisor: Supervisor
    checker: InvariantChecker
    on_phase: Callable[[Phase], None] = lambda phase: None
    identity_pod: str | None = None  # the identity Deployment's Pod the stand-in runs in
    # When the last snapshot, and the one before, began to be read: a bundle first seen
    # everywhere in a snapshot got there after the one before it.
    last_read: datetime | None = None
    read_before: datetime | None = None
    phases: list[Phase] = field(default_factory=list)
    last: CaRecord | None = None

    def record(self) -> CaRecord | None:
        """The journal as it is now, or None while Vault is down."""
        try:
            record, _ = self.journal.load_ca()
        except Exception:
            return None
        if not self.phases or self.phases[-1] is not record.phase:
            self.phases.append(record.phase)
            self.on_phase(record.phase)
        self.last = record
        return record

    def phase(self) -> Phase | None:
        return self.last.phase if self.last else None

    def _published(self) -> tuple[Published, Published] | None:
        """The directory and the cluster, each as verifiers read it, or None while the
        apiserver is down. The directory is one ``..data`` version, read before and after."""
        started = datetime.now(UTC)
        try:
            before = os.readlink(self.out / "..data")
            directory = read_directory(self.out)
            if self.cluster.issuer_cert_or_none() is None:
                return None  # not published yet
            cluster = self.cluster.read_cluster()
            if os.readlink(self.out / "..data") != before:
                return None
        except (OSError, httpx.HTTPError):
            return None
        self.read_before, self.last_read = self.last_read, started
        return directory, cluster

    def observe(self) -> bool:
        seen = self._published()
        if seen is None:
            return False
        directory, cluster = seen
        # One set of bundles (both places), observed twice: each place's issuer and client
        # chains against every bundle anywhere.
        bundles = {f"dir {k}": v for k, v in directory.bundles.items()} | dict(cluster.bundles)
        now = datetime.now(UTC)
        try:
            for found in (directory, cluster):
                published = Published(bundles, found.issuer, found.clients)
                self.checker.observe(now, published, since=self.read_before)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_tail(self.supervisor.log)}") from None
        return True

    def tick(self) -> CaRecord | None:
        self.supervisor.keep_running()
        self.observe()
        with contextlib.suppress(httpx.HTTPError):
            # What the Deployment controller and Linkerd's identity controller do.
            self.mesh.follow_restarts(self.cluster.restarted_at())
            # Linkerd's identity controller runs in the identity Deployment's Pod: a new
            # Pod is a restart (retried on the next tick if the apiserver was away).
            pod = self.mesh.pods.get((self.cluster.linkerd_ns, DEPLOYMENT))
            if self.identity.restarts and pod != self.identity_pod:
                self.identity.restart()
                self.identity_pod = pod
            if self.identity.restarts:
                self.identity.sync()
        return self.record()


def request_rotation(settings: Settings, address: str, reason: str) -> str | None:
    """POST /v1/rotate as an operator would; None when the daemon did not answer 202."""
    try:
        token = settings.api_token_file.read_text().strip()
        response = httpx.post(
            f"http://{address}/v1/rotate",
            json={"target": "trust-anchor", "reason": reason},
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
    except (OSError, httpx.HTTPError):
        return None
    if response.status_code != 202:
        return None
    operation: str = response.json()["operation"]
    return operation


# --- the servers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stoppable_kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """An apiserver of this test's own: the session's serves every other test."""
    etcd, apiserver = require_tool("etcd"), require_tool("kube-apiserver")
    with own_kube(tmp_path_factory.mktemp("chaos-kube"), etcd, apiserver) as kube:
        yield kube


def _config(cluster: RotationCluster, disk: Path, address: str) -> Settings:
    """The cluster's rotation configuration, in real time and seconds."""
    doc: dict[str, Any] = yaml.safe_load(cluster.config.read_text())
    renewal = {"lifetime": "90s", "rotate_before": "60s"}
    doc["anchor"]["local"]["dir"] = str(disk / "data")
    doc["publish"]["directory"] = str(disk / "out")
    doc["server"] = {"address": address}
    doc["root"] = {"lifetime": "2h", "rotate_before": "1h"}  # never due: two manual ones
    doc["linkerd"]["issuer"] = renewal
    doc["kong"]["intermediate"] = {"lifetime": "1h", "rotate_before": "20m"}
    for client in doc["kong"]["clients"]:
        client |= renewal
    doc["rotation"] = {
        "check_interval": "1s",
        "propagation_delay": f"{int(PROPAGATION.total_seconds())}s",
        "clock_skew": "1s",
    }
    # A restarted daemon is a new candidate: it waits out the Lease its killed self held.
    doc["leader_election"] = {
        "namespace": cluster.sa_namespace,
        "lease_duration": "4s",
        "renew_deadline": "3s",
        "retry_period": "1s",
    }
    cluster.config.write_text(yaml.safe_dump(doc))
    return load_settings(cluster.config)


def test_two_root_rotations_under_random_faults(
    tmp_path: Path,
    raft_bao: RaftOpenBao,
    stoppable_kube: Kube,
    linkerd_check: LinkerdCheck,
) -> None:
    kube, bao = stoppable_kube, raft_bao
    assert kube.apiserver is not None
    token = bao.create_token()
    cluster = make_rotation_cluster(
        kube, VaultAdmin(bao.address, token), tmp_path, "chaos", confirm="events"
    )
    write_token_file(tmp_path / "vault-token", token)
    address = f"127.0.0.1:{free_port()}"
    rng = random.Random(SEED)
    with tmpfs(tmp_path / "disk") as disk:
        settings = _config(cluster, disk, address)
        mesh = Mesh(kube, cluster.linkerd_ns, cluster.app_ns)
        mesh.control_plane(started=wall_clock() - HOUR)
        env = daemon_env(
            {
                "KUBECONFIG": str(kube.write_kubeconfig(cluster.token)),
                "CA_DAEMON_SERVER__ADDRESS": address,
            }
        )
        supervisor = Supervisor(cluster.config, env, tmp_path / "daemon.log")
        _, reader = build_anchor_and_journal(settings, create=False)
        watch = Watch(
            cluster,
            reader,
            settings.publish_directory,
            mesh,
            IdentityStandIn(kube, cluster.linkerd_ns, linkerd_check, tmp_path),
            supervisor,
            InvariantChecker(PROPAGATION - TOLERANCE, VAULT_BACKDATE),
        )
        chaos = Chaos(
            supervisor, bao, kube.apiserver, disk, int(address.rsplit(":", 1)[1]), watch.phase, rng
        )
        watch.on_phase = lambda phase: chaos.nudge() if chaos.thread else None
        started = time.monotonic()

        def until(what: str, done: Callable[[CaRecord], bool]) -> CaRecord:
            while time.monotonic() - started < DEADLINE:
                assert not chaos.errors, chaos.errors
                record = watch.tick()
                if record is not None and done(record):
                    return record
                time.sleep(POLL)
            raise AssertionError(
                f"not {what} after {DEADLINE}s (seed {SEED}, phases {watch.phases}, faults "
                f"{chaos.done}):\n{log_tail(supervisor.log)}"
            )

        def published() -> bool:
            return watch.observe() and (settings.publish_directory / "kong").exists()

        try:
            first = until("bootstrapped", lambda r: r.active_root is not None and published())
            watch.identity.restart()  # Linkerd's identity controller starts on the first bundle
            watch.identity_pod = mesh.pods.get((cluster.linkerd_ns, DEPLOYMENT))
            assert first.active_root is not None
            roots = [first.active_root.ref]
            operations: list[str] = []
            chaos.start()
            for n in (1, 2):
                asked: list[str] = []

                def ask(_: CaRecord, n: int = n, asked: list[str] = asked) -> bool:
                    operation = request_rotation(settings, address, f"chaos drill {n}")
                    if operation is not None:
                        asked.append(operation)
                    return bool(asked)

                # The request comes while the files (then the cluster) cannot be written:
                # the pass that takes it cannot publish the two-root bundle everywhere.
                blocker = "disk-full" if n == 1 else "apiserver-stopped"
                chaos.nudge(blocker)

                def in_force(_: CaRecord, blocker: str = blocker) -> bool:
                    return chaos.active == blocker

                until(f"{blocker} in force", in_force)
                until(f"rotation {n} accepted", ask)

                def rotated(r: CaRecord, op_id: str = asked[0]) -> bool:
                    op = r.operation(op_id)
                    return (
                        r.phase is Phase.STEADY
                        and len(r.roots) == 1
                        and r.roots[0].ref not in roots
                        and op is not None
                        and not op.open
                    )

                final = until(f"rotation {n} done", rotated)
                roots.append(final.roots[0].ref)
                operations.append(asked[0])
        finally:
            chaos.stop()
            try:
                # Calm: a few passes with nothing wrong, then the daemon stops.
                if not chaos.errors:
                    settle = time.monotonic() + 10
                    while time.monotonic() < settle:
                        watch.tick()
                        time.sleep(POLL)
            finally:
                supervisor.stop()
        log = supervisor.log.read_bytes()
        end = watch.record()
        report = verify_directory(settings.publish_directory, datetime.now(UTC))
        directory_check = linkerd_check(
            settings.publish_directory / "linkerd" / "ca.crt",
            settings.publish_directory / "linkerd" / "tls.crt",
            settings.publish_directory / "linkerd" / "tls.key",
        )

    assert not chaos.errors, chaos.errors
    print(
        f"chaos seed {SEED}: {len(chaos.done)} faults {chaos.done}; daemon started "
        f"{supervisor.starts} times, exits {supervisor.exits}; phases {watch.phases}; "
        f"{watch.checker.observations} observations"
    )
    # Every kind of fault was made, some of them while a rotation was under way.
    kinds = {kind for kind, _ in chaos.done}
    assert kinds == set(KINDS), (SEED, chaos.done)
    # Faults arrived in a rotation's short moments, not only while it waits to retire.
    moments = {Phase.PREPARED, Phase.PROPAGATING, Phase.ACTIVATED}
    assert any(phase in moments for _, phase in chaos.done), chaos.done
    assert supervisor.kills >= 1
    # The two rotations went through every phase, one new root each, none extra.
    assert {Phase.PROPAGATING, Phase.RETIRING} <= set(watch.phases), watch.phases
    assert end is not None
    assert [r.ref for r in end.roots] == [roots[-1]]
    assert len(set(roots)) == 3, roots
    assert VaultAdmin(bao.address, token).issuer_names(cluster.root_mount) == sorted(roots)
    assert VaultAdmin(bao.address, token).default_issuer(cluster.root_mount) == roots[-1]
    # Linkerd's identity controller loaded every issuer it was handed, the last one too,
    # and the journal says so.
    reasons = {e["reason"] for e in watch.identity.events}
    assert reasons == {"IssuerUpdated"}, watch.identity.events
    assert end.issuer_answer is not None and end.issuer_answer.loaded, end.issuer_answer
    for op_id in operations:
        op = end.operation(op_id)
        assert op is not None and op.state is OpState.SUCCEEDED, op
    # What verifiers see: the invariants held at every poll, and the end state is whole.
    assert watch.checker.observations > 200, watch.checker.observations
    assert report.ok, report.problems
    assert directory_check[0] == 0, directory_check[1]
    # The issuer Linkerd reads is signed by the last root, in the cluster and the files.
    assert cluster.issuer_cert().issuer == end.roots[0].cert.subject
    view = cluster.linkerd_view()
    assert view is not None
    files = tmp_path / "cluster-issuer"
    files.mkdir()
    for name, data in (("ca.crt", view.bundle), ("tls.crt", view.crt), ("tls.key", view.key)):
        (files / name).write_bytes(data)
    cluster_check = linkerd_check(files / "ca.crt", files / "tls.crt", files / "tls.key")
    assert cluster_check[0] == 0, cluster_check[1]
    # Floods and outages did not fill the disk with logs, and no key reached the log.
    assert len(log) < LOG_LIMIT, len(log)
    assert b"PRIVATE KEY" not in log
