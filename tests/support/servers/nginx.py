"""A real nginx (Debian package) with a config rendered per test into a tmp prefix."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from tests.support.servers.tools import ServerProcess, log_tail, require_tool

# Everything nginx writes goes under the prefix: Debian's compiled-in defaults point at
# /var/lib/nginx and /var/log/nginx, which tests must not touch.
_TEMPLATE = """\
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type text/plain;
{servers}
}}
"""


@dataclass
class Nginx:
    binary: str
    prefix: Path
    conf: Path
    process: ServerProcess | None = None  # set once started

    def argv(self, *extra: str) -> list[str]:
        error_log = str(self.prefix / "error.log")
        return [self.binary, "-p", str(self.prefix), "-c", str(self.conf), "-e", error_log, *extra]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def render(self, servers: str) -> None:
        """Write the config with these `server { ... }` blocks (http context)."""
        # `user` only means something (and is only allowed quietly) when run as root.
        user = "user root;" if os.geteuid() == 0 else ""
        self.conf.write_text(_TEMPLATE.format(user=user, prefix=self.prefix, servers=servers))

    def test_config(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on the current config (returncode and nginx's own messages)."""
        return subprocess.run(self.argv("-t"), capture_output=True, text=True, timeout=30)

    def reload(self, servers: str | None = None, timeout: float = 10.0) -> None:
        """Optionally re-render, then reload and wait until the new worker serves.

        A broken config fails here (nginx -t) instead of being silently ignored by the master.
        """
        if servers is not None:
            self.render(servers)
        checked = self.test_config()
        if checked.returncode != 0:
            raise AssertionError(f"nginx -t failed:\n{checked.stderr}")
        log = self.prefix / "error.log"
        offset = log.stat().st_size
        assert self.process is not None, "nginx is not running"
        # Signal the master directly: `nginx -s reload` would trust the pid file.
        os.kill(self.process.proc.pid, signal.SIGHUP)
        # The old worker logs this once it stopped accepting; from then on only the new
        # worker (with the new config) answers.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with log.open("rb") as f:
                f.seek(offset)
                if b"gracefully shutting down" in f.read():
                    return
            time.sleep(0.05)
        raise AssertionError(f"nginx did not reload within {timeout}s:\n{log_tail(log)}")


class NginxFactory(Protocol):
    def __call__(self, servers: str) -> Nginx: ...


@pytest.fixture(scope="session")
def nginx_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxFactory]:
    """Start nginx with the given `server { ... }` blocks: `nginx_factory(servers) -> Nginx`.

    Pick listen ports with tests.support.servers.tools.free_port(). Every instance is stopped at
    the end of the session; call `.stop()` to stop one earlier.
    """
    binary = require_tool("nginx")
    started: list[Nginx] = []

    def start(servers: str) -> Nginx:
        prefix = tmp_path_factory.mktemp("nginx")
        (prefix / "tmp").mkdir()
        nginx = Nginx(binary, prefix, prefix / "nginx.conf")
        nginx.render(servers)
        checked = nginx.test_config()
        if checked.returncode != 0:
            raise AssertionError(f"nginx -t failed:\n{checked.stderr}")
        nginx.process = ServerProcess("nginx", nginx.argv(), log_path=prefix / "stdout.log")
        started.append(nginx)
        # nginx writes its pid into the pid file after binding every listen socket. (The file
        # alone proves nothing: `nginx -t` leaves an empty one behind.)
        pid_file, pid = prefix / "nginx.pid", str(nginx.process.proc.pid)
        nginx.process.wait_ready(lambda: pid_file.read_text().strip() == pid)
        return nginx

    try:
        yield start
    finally:
        for nginx in started:
            nginx.stop()
