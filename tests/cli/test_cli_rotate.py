"""`ca-daemon rotate` and `status --url` against a running daemon on the embedded default.

A manual root rotation is asked for through the API and followed with `--wait` until
it is back in `steady` with a new root; a conflicting request meanwhile gets 409.
Real time, short lifetimes (the same shape as the kill -9 test).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
import yaml

from tests.support.cli import ca_daemon, daemon_env
from tests.support.rotation_configs import real_time_config
from tests.support.servers.tools import ServerProcess, free_port, log_tail

pytestmark = pytest.mark.integration


def _api(tmp_path: Path) -> tuple[Path, str]:
    path = real_time_config(tmp_path)
    doc = yaml.safe_load(path.read_text())
    address = f"127.0.0.1:{free_port()}"
    doc["server"] = {"address": address, "token_file": str(tmp_path / "api-token")}
    path.write_text(yaml.safe_dump(doc))
    return path, address


def test_rotate_trust_anchor_and_wait(tmp_path: Path) -> None:
    cfg, address = _api(tmp_path)
    url = f"http://{address}"
    env = daemon_env({"CA_DAEMON_SERVER__ADDRESS": address})
    log = tmp_path / "daemon.log"
    daemon = ServerProcess(
        "ca-daemon run",
        [sys.executable, "-m", "ca_daemon", "run", "--config", str(cfg)],
        log_path=log,
        env=env,
        cwd=tmp_path,
    )
    outputs: list[str] = []
    try:
        # Ready (journal and anchor loaded) comes before the first pass has published:
        # wait for both.
        out = tmp_path / "data" / "out"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                ready = False
            if ready and (out / "linkerd" / "tls.key").exists():
                break
            time.sleep(0.2)
        keys = _published_keys(out)
        token = tmp_path / "api-token"
        assert token.stat().st_mode & 0o777 == 0o600
        assert str(token) in log.read_text()  # its path is printed at start-up
        api = ("--config", str(cfg), "--url", url)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            result = ca_daemon(*args, *api, cwd=tmp_path, env=env)
            outputs.append(result.stdout + result.stderr)
            return result

        dry = cli("rotate", "kong/payments", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would IssueKongClient kong-client payments (manual rotation)" in dry.stdout

        follow = subprocess.Popen(
            [sys.executable, "-m", "ca_daemon", "rotate", "trust-anchor", "--reason", "drill",
             "--wait=retired", *api],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # As in a terminal, whatever ran the tests: a background job (CI's `cmd &`)
            # passes SIGINT on ignored, and Python then never raises KeyboardInterrupt.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        # While it runs, a second root rotation conflicts.
        conflict = None
        for _ in range(100):
            view = json.loads(cli("status", "--json").stdout)
            if view["phase"] != "steady":
                conflict = cli("rotate", "all")
                break
            time.sleep(0.2)
        assert conflict is not None and conflict.returncode == 1
        assert "409" in conflict.stderr and "in progress" in conflict.stderr
        # The local status (journal only, no API) says what the rotation waits for.
        local: list[str] = []
        for _ in range(100):
            table = ca_daemon("status", "--config", str(cfg), cwd=tmp_path, env=env).stdout
            local.append(table)
            if "waiting for:" in table or "rotation phase: steady" in table:
                break
            time.sleep(0.2)
        assert any("waiting for: " in t for t in local), local[-1]
        out, err = follow.communicate(timeout=120)
        outputs.append(out + err)
        assert follow.returncode == 0, out + err + log_tail(log)
        assert "trust-anchor: running; phase propagating" in out
        assert out.strip().splitlines()[-1].startswith("trust-anchor: succeeded")
        assert "rotated to root-3" in out

        status = cli("status", "--json")
        view = json.loads(status.stdout)
        assert view["phase"] == "steady"
        assert [r["name"] for r in view["roots"]] == ["root-3"]
        table = cli("status")
        assert table.returncode == 0 and "rotation phase: steady" in table.stdout
        bad = tmp_path / "wrong-token"
        bad.write_text("not-the-token\n")
        wrong = ca_daemon("status", *api, "--token-file", str(bad), cwd=tmp_path, env=env)
        # The daemon cannot prove it holds that token, so the CLI never sends it.
        assert wrong.returncode == 1 and "did not prove it holds this API token" in wrong.stderr
        garbled = ca_daemon("status", *api, "--token-file", str(cfg), cwd=tmp_path, env=env)
        assert garbled.returncode == 1 and "does not hold one token" in garbled.stderr
        keys |= _published_keys(tmp_path / "data" / "out")
    finally:
        daemon.stop()
    text = "\n".join(outputs) + log.read_text()
    assert "PRIVATE KEY" not in text
    assert token.read_text().strip() not in text  # the token is never echoed
    # No piece of any key the daemon made, before or after the rotation, was emitted.
    assert len(keys) >= 4
    leaked = [line for line in keys if line in text]
    assert not leaked, f"{len(leaked)} key line(s) in the output"


def _published_keys(out: Path) -> set[str]:
    """The base64 body lines of every published private key."""
    lines: set[str] = set()
    for key in [out / "linkerd" / "tls.key", *(out / "kong" / "clients").glob("*/tls.key")]:
        lines |= {ln for ln in key.read_text().splitlines() if ln and not ln.startswith("-----")}
    return lines


@contextmanager
def _daemon(tmp_path: Path, rotation: dict[str, str]) -> Iterator[tuple[Path, str, dict[str, str]]]:
    """A running daemon on the real-time configuration with ``rotation`` changed:
    (its configuration, its API URL, the environment to call it with)."""
    cfg, address = _api(tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    doc["rotation"].update(rotation)
    cfg.write_text(yaml.safe_dump(doc))
    url = f"http://{address}"
    env = daemon_env({"CA_DAEMON_SERVER__ADDRESS": address})
    daemon = ServerProcess(
        "ca-daemon run",
        [sys.executable, "-m", "ca_daemon", "run", "--config", str(cfg)],
        log_path=tmp_path / "daemon.log",
        env=env,
        cwd=tmp_path,
    )
    try:
        daemon.wait_ready(lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200)
        yield cfg, url, env
    finally:
        daemon.stop()


def test_ctrl_c_during_wait_stops_only_the_waiting(tmp_path: Path) -> None:
    # The rotation outlives the waiting.
    with _daemon(tmp_path, {"propagation_delay": "1h"}) as (cfg, url, env):
        follow = subprocess.Popen(
            [sys.executable, "-m", "ca_daemon", "rotate", "trust-anchor", "--wait",
             "--config", str(cfg), "--url", url],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # As in a terminal, whatever ran the tests: a background job (CI's `cmd &`)
            # passes SIGINT on ignored, and Python then never raises KeyboardInterrupt.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        assert follow.stdout is not None
        first = follow.stdout.readline()  # "operation <id>: trust-anchor"
        op_id = first.split()[1].rstrip(":")
        time.sleep(1)
        follow.send_signal(signal.SIGINT)
        _, err = follow.communicate(timeout=30)
        assert follow.returncode == 130, err
        assert "Traceback" not in err
        assert f"stopped waiting; operation {op_id} goes on in the daemon" in err
        token = (tmp_path / "api-token").read_text().strip()
        view = httpx.get(
            f"{url}/v1/operations/{op_id}", headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert view["state"] == "running"  # the daemon carries on


def test_wait_returns_once_the_rotation_is_in_effect_with_the_retire_date(
    tmp_path: Path,
) -> None:
    """By default `rotate trust-anchor --wait` ends when the new root signs everything, not
    when the old root retires (with default lifetimes ~30 days later), and says when."""
    # Retirement is far away.
    with _daemon(tmp_path, {"retire_delay": "1h"}) as (cfg, url, env):
        api = ("--config", str(cfg), "--url", url)
        started = time.monotonic()
        run = ca_daemon("rotate", "trust-anchor", "--wait", *api, cwd=tmp_path, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert time.monotonic() - started < 100
        last = run.stdout.strip().splitlines()[-1]
        assert last.startswith("trust-anchor: in effect since ")
        assert "the new root signs everything; the old root stays in every bundle until " in last
        view = json.loads(ca_daemon("status", "--json", *api, cwd=tmp_path, env=env).stdout)
        assert view["phase"] == "retiring"
        assert view["rotation"]["retire_after"] in last
        # A second root rotation meanwhile is refused, naming when it becomes possible.
        again = ca_daemon("rotate", "all", *api, cwd=tmp_path, env=env)
        assert again.returncode == 1
        assert f"once the old root retires, at {view['rotation']['retire_after']}" in again.stderr


def test_rotate_emergency_follows_it_to_the_old_root_gone(tmp_path: Path) -> None:
    """`rotate trust-anchor --emergency --wait=retired` on the embedded default's parts:
    the old root leaves every file once proven unused, within seconds here."""
    with _daemon(tmp_path, {}) as (cfg, url, env):
        api = ("--config", str(cfg), "--url", url)
        before = json.loads(ca_daemon("status", "--json", *api, cwd=tmp_path, env=env).stdout)
        (old,) = [r["fingerprint"] for r in before["roots"]]
        dry = ca_daemon(
            "rotate", "trust-anchor", "--emergency", "--reason", "drill", "--dry-run", *api,
            cwd=tmp_path, env=env,
        )  # fmt: skip
        assert dry.returncode == 0, dry.stderr
        assert "would write" in dry.stdout and "trust-bundle.pem" in dry.stdout, dry.stdout
        assert "would roll" not in dry.stdout  # files only: nothing to roll
        bare = ca_daemon("rotate", "trust-anchor", "--emergency", *api, cwd=tmp_path, env=env)
        assert bare.returncode == 1 and "needs a reason" in bare.stderr, bare.stderr
        issuer = ca_daemon(
            "rotate", "linkerd-issuer", "--emergency", "--reason", "key in a log", *api,
            cwd=tmp_path, env=env,
        )  # fmt: skip
        assert issuer.returncode == 0, issuer.stderr
        assert "note: " in issuer.stdout and "rotate trust-anchor --emergency" in issuer.stdout
        run = ca_daemon(
            "rotate", "trust-anchor", "--emergency", "--reason", "key in a log",
            "--wait=retired", *api, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.splitlines()[0].endswith("trust-anchor (EMERGENCY)"), run.stdout
        view = json.loads(ca_daemon("status", "--json", *api, cwd=tmp_path, env=env).stdout)
        assert view["phase"] == "steady" and view["rotation"] is None
        (new,) = [r["fingerprint"] for r in view["roots"]]
        assert new != old
        done = [o for o in view["operations"] if o["target"] == "trust-anchor"]
        assert done[-1]["emergency"] is True and done[-1]["state"] == "succeeded"


class _Squatter(BaseHTTPRequestHandler):
    """Whatever took the daemon's port: answers everything, and keeps what it was sent."""

    seen: ClassVar[list[str]] = []
    body: ClassVar[bytes] = b'{"operation": "not-yours", "proof": "0"}'

    def _answer(self) -> None:
        _Squatter.seen.append(self.headers.get("Authorization") or "")
        body = _Squatter.body
        self.send_response(202 if self.command == "POST" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (b'{"operation": "not-yours", "proof": "0"}', "did not prove it holds this API token"),
        # A daemon with server.auth=kubernetes proves nothing: the message says what to do.
        (b'{"daemon": "ca-daemon", "proof": null}', "it uses server.auth=kubernetes?"),
    ],
)
def test_the_cli_never_sends_its_token_to_a_server_that_cannot_prove_it_holds_it(
    tmp_path: Path, answer: bytes, says: str
) -> None:
    _Squatter.body = answer
    cfg, _ = _api(tmp_path)
    token = tmp_path / "api-token"
    token.write_text("the-real-token-of-this-daemon\n")
    token.chmod(0o600)
    squatter = ThreadingHTTPServer(("127.0.0.1", 0), _Squatter)
    serving = threading.Thread(target=squatter.serve_forever, daemon=True)
    serving.start()
    url = f"http://127.0.0.1:{squatter.server_address[1]}"
    try:
        _Squatter.seen.clear()
        run = ca_daemon("rotate", "kong", "--config", str(cfg), "--url", url, cwd=tmp_path)
    finally:
        squatter.shutdown()
    assert run.returncode == 1
    assert says in run.stderr and "the token was not sent" in run.stderr
    assert "not-yours" not in run.stdout
    assert _Squatter.seen and all("the-real-token" not in seen for seen in _Squatter.seen)


def test_no_daemon_at_the_default_url_says_where_that_url_came_from(tmp_path: Path) -> None:
    """rotate's default URL is server.address of the configuration it was given; when
    nothing answers there, the error says so and what to pass instead."""
    cfg, address = _api(tmp_path)  # nothing listens on this address
    token = tmp_path / "api-token"
    token.write_text("some-token\n")
    token.chmod(0o600)
    run = ca_daemon("rotate", "kong", "--config", str(cfg), cwd=tmp_path)
    assert run.returncode == 1
    assert ": unreachable (ConnectError)" in run.stderr
    assert f"http://<server.address> of the configuration {cfg}" in run.stderr
    assert "pass --url" in run.stderr
    # With --url the operator chose the address: no hint about defaults.
    explicit = ca_daemon(
        "rotate", "kong", "--config", str(cfg), "--url", f"http://{address}", cwd=tmp_path
    )
    assert explicit.returncode == 1 and "pass --url" not in explicit.stderr
