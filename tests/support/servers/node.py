"""A real single-node Kubernetes that runs real Pods: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, a kubelet, containerd and runc, and a CNI bridge.

Every address stays on this machine. The test environment makes a bridge of its own
(``BRIDGE``) holding ``HOST_IP``; the apiserver (and anything else Pods must reach, e.g.
OpenBao) listens on that address, and Pods get addresses on the bridge's subnet with no
masquerade and no route off the machine. There is no kube-proxy and no cluster DNS: a Pod
reaches the apiserver at ``HOST_IP`` (``KUBERNETES_SERVICE_HOST``, set in the Pod), and
the host reaches each Pod at its own IP.

Tear-down removes what the node made, by PID and by name: the containers' processes
(every PID in the ``kubepods`` cgroups), containerd's shims, mounts under the work dir and
``/run/containerd``, the Pods' network namespaces, the ``kubepods`` cgroups, iptables
chains the kubelet added, and the bridge. What the kubelet writes at fixed paths outside
the work dir is removed when this node created it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.servers.images import PAUSE_IMAGE, Image, node_images
from tests.support.servers.kube import Kube, own_kube
from tests.support.servers.tools import (
    ServerProcess,
    free_port,
    log_tail,
    missing,
    require_tool,
    running,
)

BRIDGE = "cad0"
SUBNET = "10.213.0.0/24"
HOST_IP = "10.213.0.1"
NODE_NAME = "127.0.0.1"  # the kubelet's hostname override: logs and exec reach it on loopback
CNI_BIN = Path("/usr/lib/cni")
# Made by the kubelet or containerd at fixed paths, whatever their configuration says.
FIXED_PATHS = (
    Path("/run/containerd"),
    Path("/var/lib/kubelet"),
    Path("/var/log/containers"),
    Path("/var/log/pods"),
    Path("/run/netns"),
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
OWNER_FILE = "owner.pid"  # the test process that started the node
IPTABLES = ("iptables", "ip6tables")


@dataclass(frozen=True)
class Node:
    """The running node: ``kube`` is the apiserver's admin handle (served on HOST_IP)."""

    kube: Kube
    workdir: Path
    containerd_socket: Path
    host_ip: str = HOST_IP

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this node's containerd, in the kubelet's namespace."""
        return subprocess.run(
            [require_tool("ctr"), "--address", str(self.containerd_socket), "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=300,
        )

    def load(self, image: Image) -> None:
        """Import a docker-archive into containerd, where the kubelet finds it."""
        self.ctr("images", "import", str(image.archive))

    def pod_logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        """The container logs the kubelet keeps for ``pod`` (every restart), for messages."""
        base = self.workdir / "pod-logs"
        texts = []
        for directory in sorted(base.glob(f"{namespace}_{pod}_*")):
            for path in sorted(directory.glob(f"{container or '*'}/*.log")):
                texts.append(f"--- {path.relative_to(base)}\n{log_tail(path, 60)}")
        return "\n".join(texts) or f"<no logs for {namespace}/{pod}>"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def _kubeconfig(kube: Kube, path: Path) -> Path:
    return kube.write_kubeconfig(kube.admin_token, path)


# --- the pieces ----------------------------------------------------------------------------


def _make_bridge() -> None:
    _remove_bridge()  # a leftover of a run that was killed
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")


def _remove_bridge() -> None:
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        _run("ip", "link", "del", BRIDGE, check=False)


def _write_cni(workdir: Path) -> Path:
    conf_dir = workdir / "cni" / "net.d"
    conf_dir.mkdir(parents=True)
    config = {
        "cniVersion": "0.4.0",
        "name": "ca-daemon-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,  # nothing leaves the machine
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET, "gateway": HOST_IP}]],
                    "dataDir": str(workdir / "cni" / "ipam"),
                },
            }
        ],
    }
    (conf_dir / "10-ca-daemon-test.conflist").write_text(json.dumps(config))
    return conf_dir


def _start_containerd(workdir: Path, cni_conf: Path) -> tuple[ServerProcess, Path]:
    base = workdir / "containerd"
    base.mkdir()
    socket = base / "containerd.sock"
    cri = '[plugins."io.containerd.grpc.v1.cri"'
    config = f"""
version = 2
root = "{base / "root"}"
state = "{base / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{base / "ttrpc.sock"}"
{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj, and every sandbox
  # would fail to start without this.
  restrict_oom_score_adj = true
{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{cni_conf}"
{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{base / "runc"}"
"""
    config_path = base / "config.toml"
    config_path.write_text(config)
    server = ServerProcess(
        "containerd",
        [require_tool("containerd"), "--config", str(config_path), "--log-level", "warn"],
        log_path=workdir / "containerd.log",
        env={**os.environ, "PATH": f"{Path(require_tool('runc')).parent}:{os.environ['PATH']}"},
    )

    def ready() -> bool:
        return (
            subprocess.run(
                [require_tool("ctr"), "--address", str(socket), "version"],
                capture_output=True,
                timeout=5,
            ).returncode
            == 0
        )

    server.wait_ready(ready, timeout=30)
    return server, socket


def _start_controller_manager(kube: Kube, workdir: Path) -> ServerProcess:
    return ServerProcess(
        "kube-controller-manager",
        [
            require_tool("kube-controller-manager"),
            f"--kubeconfig={_kubeconfig(kube, workdir / 'controller-manager.kubeconfig')}",
            f"--service-account-private-key-file={kube.workdir / 'sa.key'}",
            # Publishes kube-root-ca.crt in every namespace, which projected tokens need.
            f"--root-ca-file={kube.ca_file}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
        ],
        log_path=workdir / "kube-controller-manager.log",
    )


def _start_scheduler(kube: Kube, workdir: Path) -> ServerProcess:
    return ServerProcess(
        "kube-scheduler",
        [
            require_tool("kube-scheduler"),
            f"--kubeconfig={_kubeconfig(kube, workdir / 'scheduler.kubeconfig')}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
        ],
        log_path=workdir / "kube-scheduler.log",
    )


def _start_kubelet(kube: Kube, workdir: Path, socket: Path) -> ServerProcess:
    base = workdir / "kubelet"
    base.mkdir()
    config: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        # Root here cannot lower oom_score_adj (no CAP_SYS_RESOURCE).
        "oomScoreAdj": 0,
        "address": "127.0.0.1",
        "port": free_port(),
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": free_port(),
        "readOnlyPort": 0,
        "podLogsDir": str(workdir / "pod-logs"),
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},  # listens on loopback only
        "failSwapOn": False,
        "makeIPTablesUtilChains": False,
        "registerNode": True,
        # A full disk must not evict the test's Pods or delete the images it imported.
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "resolvConf": "",
        "containerRuntimeEndpoint": f"unix://{socket}",
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "nodeStatusUpdateFrequency": "5s",
    }
    config_path = base / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return ServerProcess(
        "kubelet",
        [
            require_tool("kubelet"),
            f"--config={config_path}",
            f"--kubeconfig={_kubeconfig(kube, base / 'kubelet.kubeconfig')}",
            f"--root-dir={base / 'root'}",
            f"--cert-dir={base / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={HOST_IP}",
            "--v=1",
        ],
        log_path=workdir / "kubelet.log",
    )


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, detail: Callable[[], str] = str
) -> None:
    """Poll ``check`` every half second until it holds; fail naming ``what`` and why."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # the apiserver or a Pod not there yet
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:.0f}s\n{detail()}")


def _node_ready(kube: Kube) -> bool:
    with kube.http() as http:
        response = http.get(f"/api/v1/nodes/{NODE_NAME}")
    if response.status_code != 200:
        return False
    conditions = response.json()["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


# --- tear-down -----------------------------------------------------------------------------


def _kill_pids(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _kubepods_cgroups() -> list[Path]:
    """Every kubepods cgroup, deepest first (cgroup v1: one tree per controller)."""
    found: list[Path] = []
    for controller in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else ():
        top = controller / "kubepods"
        if top.is_dir():
            found += [Path(d) for d, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _kill_containers() -> None:
    """SIGKILL every process in a Pod's cgroup, until none is left."""
    for _ in range(20):
        pids: set[int] = set()
        for group in _kubepods_cgroups():
            with contextlib.suppress(OSError):
                pids |= {int(p) for p in (group / "cgroup.procs").read_text().split()}
        if not pids:
            return
        _kill_pids(pids)
        time.sleep(0.2)


def _shim_pids(socket: Path) -> set[int]:
    """containerd's shims for this node: they outlive containerd itself."""
    return {
        pid
        for pid, argv in processes().items()
        if argv and argv[0].endswith("containerd-shim-runc-v2") and str(socket) in argv
    }


def _mounts_under(*roots: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if any(point == str(r) or point.startswith(f"{r}/") for r in roots):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _unmount(*roots: Path) -> None:
    for _ in range(3):
        points = _mounts_under(*roots)
        if not points:
            return
        for point in points:
            _run("umount", "-l", point, check=False)


def _netns_of_pods() -> list[Path]:
    netns = Path("/run/netns")
    return sorted(netns.glob("cni-*")) if netns.is_dir() else []


def _iptables_chains() -> set[tuple[str, str, str]]:
    """(tool, table, chain) for every chain there is now."""
    chains = set()
    for tool in IPTABLES:
        for table in ("filter", "nat", "mangle"):
            result = _run(tool, "-t", table, "-S", check=False)
            for line in result.stdout.splitlines():
                if line.startswith("-N "):
                    chains.add((tool, table, line.split()[1]))
    return chains


def _remove_chains(chains: set[tuple[str, str, str]]) -> None:
    for tool, table, chain in chains:
        # Rules that jump to it first, then its own rules, then the chain.
        listing = _run(tool, "-t", table, "-S", check=False).stdout.splitlines()
        for rule in listing:
            if rule.startswith("-A ") and f"-j {chain}" in rule:
                _run(tool, "-t", table, *("-D", *rule.split()[1:]), check=False)
        _run(tool, "-t", table, "-F", chain, check=False)
        _run(tool, "-t", table, "-X", chain, check=False)


@contextmanager
def _cleanup(workdir: Path, socket: Path, created: list[Path]) -> Iterator[None]:
    chains_before = _iptables_chains()
    try:
        yield
    finally:
        _kill_containers()
        _kill_pids(_shim_pids(socket))
        _unmount(workdir, *created)
        for ns in _netns_of_pods():
            _run("ip", "netns", "delete", ns.name, check=False)
            with contextlib.suppress(OSError):
                ns.unlink()
        for group in _kubepods_cgroups():
            with contextlib.suppress(OSError):
                group.rmdir()
        _remove_chains(_iptables_chains() - chains_before)
        _remove_bridge()
        for path in created:
            subprocess.run(["rm", "-rf", str(path)], check=False)


def processes() -> dict[int, list[str]]:
    """Every process on this machine: its argv by PID."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                raw = (proc / "cmdline").read_bytes().split(b"\0")
                found[int(proc.name)] = [a.decode(errors="replace") for a in raw if a]
    return found


def _node_workdirs(argvs: dict[int, list[str]]) -> set[Path]:
    """Work dirs of nodes still running here, found from their containerd, its shims and
    their kubelet: stale unless their owner runs (a run killed before its tear-down)."""
    # containerd's --config and its shims' -address, the kubelet's --config.
    ours = {
        ("containerd", "config.toml"),
        ("containerd", "containerd.sock"),
        ("kubelet", "config.yaml"),
    }
    found = set()
    for argv in argvs.values():
        for arg in argv:
            path = Path(arg.split("=", 1)[-1])
            if (path.parent.name, path.name) in ours:
                found.add(path.parent.parent)
    return found


def _owner_alive(workdir: Path) -> bool:
    """The test process that started the node in ``workdir`` still runs (its node is
    live, not stale: another run on this machine, to be refused, never reclaimed)."""
    try:
        pid = int((workdir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False  # gone, or a node from before owners were written
    return Path(f"/proc/{pid}").exists() and pid != os.getpid()


def _reclaim() -> list[str]:
    """Remove what a killed run's node left: its processes (anything naming its work dir
    or serving on HOST_IP), containers, mounts, network namespaces, cgroups and bridge.
    Returns what was found, for the log."""
    argvs = processes()
    workdirs = _node_workdirs(argvs)
    if any(_owner_alive(w) for w in workdirs):
        return []  # another run's node is live: refused below, never touched
    if not workdirs and not _kubepods_cgroups() and not _netns_of_pods():
        return []
    marks = [str(w) for w in workdirs] + [HOST_IP]
    mine = {pid for pid, argv in argvs.items() if any(m in a for a in argv for m in marks)}
    mine.discard(os.getpid())
    _kill_pids(mine)
    _kill_containers()
    _unmount(*workdirs)
    for ns in _netns_of_pods():
        _run("ip", "netns", "delete", ns.name, check=False)
    for group in _kubepods_cgroups():
        with contextlib.suppress(OSError):
            group.rmdir()
    _remove_bridge()
    return [*marks[:-1], f"{len(mine)} processes"]


def _leftovers() -> list[str]:
    """What a node would leave behind, after reclaiming a killed run's: refuse to share
    the machine with anything still there."""
    found = [str(p) for p in _kubepods_cgroups()[:1]]
    found += [str(p) for p in _netns_of_pods()]
    return found


# --- the node --------------------------------------------------------------------------------


@contextmanager
def own_node(workdir: Path, images: list[Image]) -> Iterator[Node]:
    """Start the whole node in ``workdir`` with ``images`` loaded; remove it all on exit."""
    for tool in (
        "containerd",
        "runc",
        "ctr",
        "kubelet",
        "kube-controller-manager",
        "kube-scheduler",
        "etcd",
        "kube-apiserver",
        "iptables",
    ):
        require_tool(tool)
    if not (CNI_BIN / "bridge").exists():
        missing(f"the CNI bridge plugin is not in {CNI_BIN} (containernetworking-plugins)")
    if os.geteuid() != 0:
        missing("a node needs root")
    if reclaimed := _reclaim():
        warnings.warn(f"removed a node a killed run left behind: {reclaimed}", stacklevel=2)
    if leftovers := _leftovers():
        pytest.fail(f"a node of an earlier run is still here: {leftovers}")
    (workdir / OWNER_FILE).write_text(str(os.getpid()))
    created = [p for p in FIXED_PATHS if not p.exists()]
    socket = workdir / "containerd" / "containerd.sock"
    with ExitStack() as stack:
        stack.enter_context(_cleanup(workdir, socket, created))
        _make_bridge()
        cni_conf = _write_cni(workdir)
        containerd, socket = _start_containerd(workdir, cni_conf)
        stack.enter_context(running(containerd))
        kube = stack.enter_context(
            own_kube(
                workdir / "kube",
                require_tool("etcd"),
                require_tool("kube-apiserver"),
                address=HOST_IP,
                controller_manager=True,
                extra_args=(
                    f"--client-ca-file={workdir / 'kube' / 'ca.crt'}",
                    "--kubelet-preferred-address-types=Hostname,InternalIP",
                ),
            )
        )
        node = Node(kube=kube, workdir=workdir, containerd_socket=socket)
        for image in images:
            node.load(image)
        for start in (_start_controller_manager, _start_scheduler):
            stack.enter_context(running(start(kube, workdir)))
        kubelet = stack.enter_context(running(_start_kubelet(kube, workdir, socket)))
        wait_for(
            "the node Ready",
            lambda: _node_ready(kube),
            timeout=120,
            detail=lambda: log_tail(kubelet.log_path, 30),
        )
        yield node


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """The single-node cluster, with the pause and busybox images loaded."""
    workdir = tmp_path_factory.mktemp("node")
    (workdir / "kube").mkdir()
    with own_node(workdir, node_images()) as running_node:
        yield running_node
