"""The API server fails loudly and holds up under abuse: a port already in use stops the
daemon before any token is written; idle connections are closed and capped, so a flood
of them never starves the passes of file descriptors or fills the log. And a long pass
never starves the probes: /healthz and /readyz answer well within the chart's probe
timeout throughout a first issue of thousands of clients, and the daemon is ready as soon
as it loaded the journal, not when that pass ends."""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.cli import ca_daemon, daemon_env
from tests.support.servers.tools import ServerProcess, free_port
from tests.support.settings import local_config, numbered_clients

pytestmark = pytest.mark.integration

CHART_VALUES = Path(__file__).resolve().parents[2] / "charts" / "ca-daemon" / "values.yaml"
# Enough clients for a first pass of many seconds (about 2 ms each to issue and publish).
LONG_PASS_CLIENTS = 2000

# The daemon runs with this many file descriptors; more idle connections than that are
# opened against it (the case that used to stop every pass with "Too many open files").
FD_LIMIT = 64
IDLE = 80


def _config(tmp_path: Path, address: str) -> Path:
    return local_config(
        tmp_path,
        rotation={"check_interval": "1s"},
        server={"address": address, "token_file": str(tmp_path / "api-token")},
    )


def test_a_port_in_use_stops_the_daemon_before_a_token_is_written(tmp_path: Path) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    address = f"127.0.0.1:{squatter.getsockname()[1]}"
    try:
        started = time.monotonic()
        run = ca_daemon(
            "run",
            "--config",
            str(_config(tmp_path, address)),
            cwd=tmp_path,
            env={"CA_DAEMON_SERVER__ADDRESS": address},
        )
    finally:
        squatter.close()
    assert run.returncode == 1, run.stderr
    assert f"error: the API cannot listen on {address}: Address already in use" in run.stderr
    assert "listening" not in run.stderr
    assert not (tmp_path / "api-token").exists()
    assert not (tmp_path / "data" / "out").exists()  # no pass ran
    assert time.monotonic() - started < 30


def test_idle_connections_are_closed_and_capped(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    url = f"http://{address}"
    cfg = _config(tmp_path, address)
    log = tmp_path / "daemon.log"
    limited = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT}))\n"
        "from ca_daemon.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    daemon = ServerProcess(
        "ca-daemon run",
        [sys.executable, "-c", limited, "run", "--config", str(cfg)],
        log_path=log,
        env=daemon_env({"CA_DAEMON_SERVER__ADDRESS": address}),
        cwd=tmp_path,
    )
    idle: list[socket.socket] = []
    try:
        daemon.wait_ready(lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200)
        for _ in range(IDLE):
            idle.append(socket.create_connection(("127.0.0.1", int(address.rsplit(":")[1]))))
        # Every idle connection is closed by the daemon (capped at once, or timed out).
        for sock in idle:
            sock.settimeout(30)
            with contextlib.suppress(ConnectionResetError):  # aborted by the cap
                assert sock.recv(1) == b""
        # The daemon still serves, and its passes still run with the descriptors it has.
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        marker = (tmp_path / "data" / "out").stat().st_mtime_ns
        time.sleep(3)
        assert daemon.proc.poll() is None
        text = log.read_text()
        assert "Too many open files" not in text
        assert text.count("connections open, the most it keeps") <= 1  # said once, not per socket
        assert len(text.splitlines()) < 200
        assert (tmp_path / "data" / "out").stat().st_mtime_ns >= marker
    finally:
        for sock in idle:
            sock.close()
        daemon.stop()


def test_probes_answer_throughout_a_long_first_pass(tmp_path: Path) -> None:
    probes = yaml.safe_load(CHART_VALUES.read_text())["probes"]
    timeout = min(p["timeoutSeconds"] for p in probes.values())
    address = f"127.0.0.1:{free_port()}"
    url = f"http://{address}"
    cfg = local_config(tmp_path, kong=numbered_clients(LONG_PASS_CLIENTS))
    clients = tmp_path / "data" / "out" / "kong" / "clients"
    daemon = ServerProcess(
        "ca-daemon run",
        [sys.executable, "-m", "ca_daemon", "run", "--config", str(cfg)],
        log_path=tmp_path / "daemon.log",
        env=daemon_env({"CA_DAEMON_SERVER__ADDRESS": address}),
        cwd=tmp_path,
    )
    slowest = 0.0
    ready_before_published = False
    try:
        daemon.wait_ready(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200)
        deadline = time.monotonic() + 300
        while not (clients.is_dir() and len(list(clients.iterdir())) == LONG_PASS_CLIENTS):
            assert time.monotonic() < deadline, "the first pass did not publish in 5 minutes"
            published = clients.is_dir()
            for path in ("/healthz", "/readyz"):
                started = time.monotonic()
                answer = httpx.get(f"{url}{path}", timeout=timeout)
                slowest = max(slowest, time.monotonic() - started)
                if path == "/readyz" and answer.status_code == 200 and not published:
                    ready_before_published = True
            time.sleep(0.1)
    finally:
        daemon.stop()
    # Half the probe timeout at most: the kubelet's probes never fail on a busy pass.
    assert slowest < timeout / 2, slowest
    assert ready_before_published, "ready only once the first pass had published"
