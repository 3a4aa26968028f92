"""Several ca-daemon processes on one fresh data directory: one owns it at a time.

Without the lock, two `run --once` at once sometimes left a root key that does not
match the journal's root, overwrote the passphrase, or published an older state.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from ca_daemon.pki.bundle import fingerprint
from ca_daemon.pki.keys import key_matches_certificate, load_private_key
from ca_daemon.service.datalock import LOCK_NAME, DataDirBusy, owning
from tests.support.cli import ca_daemon, daemon_env
from tests.support.journal_files import credential_docs

pytestmark = pytest.mark.integration

WAITING = "waiting for ca-daemon-data held by pid"


def _start(cwd: Path, *args: str, stderr: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ca_daemon", *args],
        cwd=cwd,
        env=daemon_env(),
        stdout=subprocess.PIPE,
        stderr=stderr.open("w") if stderr else subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], stderr: Path | None = None) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, stderr.read_text() if stderr else err


def check_one_ca(workdir: Path) -> None:
    """Exactly one root; the passphrase opens every key, and each matches its certificate;
    the journal, the anchor and what is published agree (`verify` passes)."""
    data = workdir / "ca-daemon-data"
    assert len(list(data.glob("anchor/root-*.crt"))) == 1
    passphrase = (data / "passphrase").read_bytes().strip()
    for key_path in data.glob("anchor/*.key"):
        cert = x509.load_pem_x509_certificate(key_path.with_suffix(".crt").read_bytes())
        assert key_matches_certificate(load_private_key(key_path.read_bytes(), passphrase), cert)
    docs = credential_docs(data)
    assert sorted(docs) == ["kong/example", "linkerd-issuer"]
    for doc in docs.values():
        cert = x509.load_pem_x509_certificate(doc["cert"].encode())
        assert key_matches_certificate(load_private_key(doc["key"].encode(), passphrase), cert)
    state = json.loads((data / "state.json").read_text())["state"]
    (root,) = state["roots"]
    on_disk = x509.load_pem_x509_certificate((data / "anchor" / f"{root['ref']}.crt").read_bytes())
    assert fingerprint(x509.load_pem_x509_certificate(root["cert"].encode())) == fingerprint(
        on_disk
    )
    verified = ca_daemon("verify", cwd=workdir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    again = ca_daemon("run", "--once", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "Issue" not in again.stdout and "Create" not in again.stdout
    assert "0 change(s)" in again.stdout


@pytest.mark.parametrize(("processes", "rounds"), [(2, 10), (5, 6)])
def test_simultaneous_runs_on_a_fresh_directory(
    tmp_path: Path, processes: int, rounds: int
) -> None:
    waited = 0
    for n in range(rounds):
        workdir = tmp_path / f"round-{n}"
        workdir.mkdir()
        procs = [_start(workdir, "run", "--once") for _ in range(processes)]
        results = [_finish(p) for p in procs]
        for code, out, err in results:
            assert code == 0, out + err
        creators = [out for _, out, _ in results if "CreateRoot trust-anchor root-1" in out]
        assert len(creators) == 1, [out for _, out, _ in results]
        # Every other process found the CA complete: it waited, or came after.
        for _, out, _err in results:
            if out not in creators:
                assert "Issue" not in out and "Create" not in out, out
        waited += sum(WAITING in err for _, _, err in results)
        check_one_ca(workdir)
    # Started together, they mostly overlap (one may finish before another starts):
    # many had to wait, and said so; the test above makes every one of them wait.
    assert waited >= rounds // 2, waited


def test_the_waiting_process_says_who_holds_the_directory(tmp_path: Path) -> None:
    data = tmp_path / "ca-daemon-data"
    logs = [tmp_path / f"run-{i}.err" for i in range(3)]
    with owning(data):  # this test process owns it, as a running daemon would
        daemon = _start(tmp_path, "run")
        code, _, err = _finish(daemon)
        assert code == 1
        assert f"error: another ca-daemon (pid {os.getpid()}) owns ca-daemon-data" in err
        procs = [_start(tmp_path, "run", "--once", stderr=log) for log in logs]
        deadline = time.monotonic() + 60
        while not all(f"{WAITING} {os.getpid()}" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            assert all(p.poll() is None for p in procs)
            time.sleep(0.1)
    results = [_finish(p, log) for p, log in zip(procs, logs, strict=True)]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    assert sum("CreateRoot" in out for _, out, _ in results) == 1
    for _, _, err in results:
        assert err.count("waiting for") == 1  # said once, not once per retry
    check_one_ca(tmp_path)


def test_a_running_daemon_keeps_the_directory(tmp_path: Path) -> None:
    daemon = _start(tmp_path, "run", stderr=tmp_path / "daemon.err")
    try:
        lock = tmp_path / "ca-daemon-data" / LOCK_NAME
        deadline = time.monotonic() + 60
        while not (tmp_path / "ca-daemon-data/out/trust-bundle.pem").exists():
            assert daemon.poll() is None, (tmp_path / "daemon.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert lock.read_text().strip() == str(daemon.pid)
        started = time.monotonic()
        second = ca_daemon("run", cwd=tmp_path)
        assert second.returncode == 1
        assert f"another ca-daemon (pid {daemon.pid}) owns ca-daemon-data" in second.stderr
        assert time.monotonic() - started < 20  # at once, not after a wait
        assert "PRIVATE KEY" not in second.stdout + second.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    check_one_ca(tmp_path)


def test_waiting_is_bounded(tmp_path: Path) -> None:
    said: list[str] = []
    with (
        owning(tmp_path),
        pytest.raises(DataDirBusy) as busy,
        owning(tmp_path, wait=0.3, say=said.append),
    ):
        raise AssertionError("acquired a lock that is held")
    assert said == [f"waiting for {tmp_path} held by pid {os.getpid()} (up to 0.3s)"]
    assert f"{tmp_path} is still held by another ca-daemon (pid {os.getpid()})" in str(busy.value)
    with owning(tmp_path, wait=0.3):  # released with its holder
        pass


def test_a_passphrase_created_by_many_processes_at_once_is_one_passphrase(
    tmp_path: Path,
) -> None:
    """Also outside the lock (a passphrase_file shared by two directories)."""
    script = (
        "import hashlib, sys; from pathlib import Path; "
        "from ca_daemon.anchor.local import load_or_create_passphrase as f; "
        "print(hashlib.sha256(f(Path(sys.argv[1]))).hexdigest())"
    )
    for n in range(5):
        path = tmp_path / f"round-{n}" / "passphrase"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(path)],
                env=daemon_env(),
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        seen = {p.communicate(timeout=60)[0].strip() for p in procs}
        assert seen == {hashlib.sha256(path.read_bytes().strip()).hexdigest()}
        assert path.stat().st_mode & 0o777 == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["passphrase"]  # no temporary left
