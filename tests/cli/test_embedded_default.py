"""`ca-daemon run --once` with no configuration, end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ca_daemon.pki.keys import generate_key, private_key_pem
from tests.support.cli import ca_daemon

pytestmark = pytest.mark.integration

LAYOUT = {
    "trust-bundle.pem",
    "linkerd/ca.crt",
    "linkerd/tls.crt",
    "linkerd/tls.key",
    "kong/clients/example/tls.crt",
    "kong/clients/example/tls.key",
    "kong/clients/example/ca.crt",
}


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("laptop")
    result = ca_daemon("run", "--once", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return workdir


def test_layout_and_modes(published: Path) -> None:
    out = published / "ca-daemon-data" / "out"
    # The documented paths are symlinks through ..data (the kubelet's layout): follow
    # them, and leave out the ..data link and the ..<timestamp> version it points to.
    files = {
        (Path(d) / n).relative_to(out).as_posix()
        for d, _, names in os.walk(out, followlinks=True)
        if not Path(d).relative_to(out).as_posix().startswith("..")
        for n in names
        if not n.startswith("..")
    }
    kong_cas = {f for f in files if f.startswith("kong/ca/")}
    assert files - kong_cas == LAYOUT
    assert len(kong_cas) == 1 and next(iter(kong_cas)).endswith(".pem")
    for path in out.rglob("*.key"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    bundle = (out / "trust-bundle.pem").read_bytes()
    assert (out / "linkerd/ca.crt").read_bytes() == bundle
    assert (out / "kong/clients/example/ca.crt").read_bytes() == bundle
    assert (out / "linkerd/tls.crt").read_text().count("BEGIN CERTIFICATE") == 1
    assert (out / "kong/clients/example/tls.crt").read_text().count("BEGIN CERTIFICATE") == 2
    passphrase = published / "ca-daemon-data" / "passphrase"
    assert passphrase.stat().st_mode & 0o777 == 0o600


def test_verify_passes_then_fails_on_tampering(published: Path, tmp_path: Path) -> None:
    ok = ca_daemon("verify", cwd=published)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout

    copy = tmp_path / "copy"
    shutil.copytree(published, copy)
    out = copy / "ca-daemon-data" / "out"
    (out / "linkerd" / "tls.key").write_bytes(private_key_pem(generate_key()))
    bad_key = ca_daemon("verify", cwd=copy)
    assert bad_key.returncode == 1
    assert "linkerd issuer: private key does not match the certificate" in bad_key.stdout

    shutil.rmtree(copy)
    shutil.copytree(published, copy)
    foreign = ca_daemon("run", "--once", cwd=tmp_path)  # another CA, another root
    assert foreign.returncode == 0
    foreign_out = tmp_path / "ca-daemon-data" / "out"
    shutil.copy(foreign_out / "trust-bundle.pem", out / "trust-bundle.pem")
    mismatched = ca_daemon("verify", cwd=copy)
    assert mismatched.returncode == 1
    assert "linkerd/ca.crt differs from trust-bundle.pem" in mismatched.stdout
    assert "linkerd issuer: is not signed by any root in the trust bundle" in mismatched.stdout
    assert "kong client example: client chain does not verify" in mismatched.stdout

    (out / "kong" / "clients" / "example" / "tls.key").chmod(0o644)
    assert "mode must be 0600" in ca_daemon("verify", cwd=copy).stdout


def test_second_run_is_idempotent_and_status_reads_state(published: Path) -> None:
    out = published / "ca-daemon-data" / "out"
    before = {p: (p.stat().st_ino, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = ca_daemon("run", "--once", cwd=published)
    assert again.returncode == 0
    assert "published directory ca-daemon-data/out: 0 change(s)" in again.stdout
    assert {p: (p.stat().st_ino, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before

    status = ca_daemon("status", cwd=published)
    assert status.returncode == 0
    assert "rotation phase: steady" in status.stdout
    for name in ("root-1", "linkerd-identity-issuer", "kong-2", "example"):
        assert name in status.stdout
    # Files only: the defaults linkerd.restart and linkerd.gate cannot act, and status says so.
    assert status.stdout.startswith("note: files only: Linkerd is neither restarted nor gated")
    as_json = json.loads(ca_daemon("status", "--json", cwd=published).stdout)
    assert as_json["notes"] == [status.stdout.splitlines()[0].removeprefix("note: ")]


def test_no_private_key_in_output(published: Path, tmp_path: Path) -> None:
    result = ca_daemon("run", "--once", cwd=tmp_path)
    assert result.returncode == 0
    for stream in (result.stdout, result.stderr):
        assert "PRIVATE KEY" not in stream
