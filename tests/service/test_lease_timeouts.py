"""A Lease round against an API server that does not answer ends within its bound, well
inside ``leader_election.renew_deadline``: no urllib3 retries, one total timeout per
request (connecting included). Two kinds of unreachable, on loopback sockets: one whose
accept queue is full, so connections hang in SYN (a blackholed address), and one that
accepts and never answers (a wedged server)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from ca_daemon.config.settings import Settings
from ca_daemon.service.leader import build_elector, request_timeout

pytestmark = pytest.mark.usefixtures("clean_env")

RENEW_DEADLINE = 3.0


@contextmanager
def silent_server() -> Iterator[int]:
    """Accepts every connection and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@contextmanager
def full_backlog() -> Iterator[int]:
    """A listening socket that never accepts, its queue filled: a new connection's SYN is
    dropped, as on an address nothing answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.3)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                filler.close()
                break
            fillers.append(filler)
        else:
            pytest.skip("the kernel kept accepting into a full queue")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def _settings(tmp_path: Path, port: int, make_settings: Callable[..., Settings]) -> Settings:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return make_settings(
        {
            "leader_election": {
                "enabled": True,
                "namespace": "ca-daemon",
                "lease_duration": "5s",
                "renew_deadline": f"{int(RENEW_DEADLINE)}s",
                "retry_period": "1s",
            }
        }
    )


@pytest.mark.parametrize("unreachable", [silent_server, full_backlog], ids=["silent", "blackhole"])
def test_a_lease_round_against_an_unreachable_server_ends_within_its_bound(
    unreachable: Callable[[], AbstractContextManager[int]],
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound = request_timeout(timedelta(seconds=RENEW_DEADLINE))
    assert bound == pytest.approx(RENEW_DEADLINE / 3)
    with unreachable() as port:
        settings = _settings(tmp_path, port, make_settings)
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        elector = build_elector(settings, lambda leader, holder: None)
        started = time.monotonic()
        leading = elector.try_acquire_or_renew()
        took = time.monotonic() - started
    assert not leading
    # One request (the read failed, nothing is written): its bound and a little slack,
    # and well inside the renew deadline. urllib3's retries made it four bounds.
    assert took < bound + 0.5 <= RENEW_DEADLINE / 2, took
