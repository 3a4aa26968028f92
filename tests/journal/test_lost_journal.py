"""A lost or corrupt journal (docs/recovery.md): the daemon stops with a message that says
what it found and how to recover, or rebuilds the journal from the anchor's named CAs —
never a fresh root and a bundle without the roots in use."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from ca_daemon.anchor.local import DEFAULT_ROOT, LocalAnchor
from ca_daemon.config.loading import load_settings
from ca_daemon.model.state import CA_FEATURES_VERSION
from ca_daemon.pki.bundle import fingerprint
from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.pki.profiles import Subject, Validity
from ca_daemon.service.wiring import build_engine
from tests.support.cli import ca_daemon
from tests.support.invariants import InvariantChecker, read_directory
from tests.support.journal_files import shard_path
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import unique
from tests.support.vault_helpers import bao_json, run_daemon, vault_config

pytestmark = pytest.mark.integration


def local_config(tmp_path: Path) -> Path:
    doc = {
        "anchor": {"local": {"dir": str(tmp_path / "data")}},
        "publish": {"kubernetes": {"enabled": False}},
        "kong": {"clients": [{"name": "payments", "common_name": "kong.payments.upstream"}]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_once(config: Path) -> tuple[int, str]:
    result = ca_daemon("run", "--once", "--config", str(config), cwd=config.parent)
    return result.returncode, result.stdout + result.stderr


def check_published(out: Path) -> None:
    """Every published certificate chains to a root in every published bundle."""
    checker = InvariantChecker(timedelta(0), timedelta(minutes=5))
    checker.observe(datetime.now(UTC), read_directory(out))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.suffix != ".lock"
    }


@pytest.fixture
def running_local(tmp_path: Path) -> Path:
    config = local_config(tmp_path)
    code, output = run_once(config)
    assert code == 0, output
    return config


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot json at all")


def _not_object(path: Path) -> None:
    path.write_text("[1, 2, 3]\n")


def _newer(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["state"]["version"] = CA_FEATURES_VERSION + 1
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_truncate, "is not valid JSON"),
        (_garbage, "is not valid JSON"),
        (_not_object, "is not a journal record"),
        (_newer, "written by a newer ca-daemon"),
    ],
    ids=["truncated", "not-json", "not-an-object", "newer-version"],
)
def test_a_corrupt_state_file_stops_the_pass_and_changes_nothing(
    running_local: Path, damage: object, expected: str
) -> None:
    data = running_local.parent / "data"
    state = data / "state.json"
    assert callable(damage)
    damage(state)
    before = snapshot(data)
    code, output = run_once(running_local)
    assert code == 1, output
    assert expected in output and str(state.parent) in output, output
    if expected != "written by a newer ca-daemon":
        assert "move it aside" in output and "restore it from a backup" in output
    assert "CreateRoot" not in output and "RebuildJournal" not in output
    assert snapshot(data) == before  # nothing written, nothing published
    assert sorted(p.name for p in (data / "anchor").glob("root-*.crt")) == ["root-1.crt"]
    check_published(data / "out")


def test_a_corrupt_credential_record_is_an_error_and_is_not_overwritten(
    running_local: Path,
) -> None:
    data = running_local.parent / "data"
    record = shard_path(data, "kong/payments")
    _truncate(record)
    damaged = record.read_bytes()
    code, output = run_once(running_local)
    assert code == 1, output
    assert str(record) in output and "is not valid JSON" in output
    assert "issued anew" in output
    assert record.read_bytes() == damaged
    check_published(data / "out")
    # The documented recovery: delete it; the credential is issued anew.
    record.unlink()
    code, output = run_once(running_local)
    assert code == 0, output
    assert "IssueKongClient payments (missing): ok" in output or "IssueKongClient" in output
    check_published(data / "out")


def _extra_roots(data: Path, refs: list[str]) -> None:
    """Roots made in the anchor but never used (as a prepared rotation leaves them)."""
    anchor = LocalAnchor(data, (data / "passphrase").read_bytes().strip())
    now = datetime.now(UTC)
    for ref in refs:
        anchor.create_root(
            ref,
            Subject("root.linkerd.cluster.local"),
            "ec-p256",
            Validity(now - timedelta(minutes=5), now + timedelta(days=300)),
        )


def test_a_deleted_state_file_is_rebuilt_from_the_anchor_keeping_the_root_in_use(
    running_local: Path,
) -> None:
    data = running_local.parent / "data"
    _extra_roots(data, ["root-3", "root-4", "root-5"])  # kong-2 is the intermediate
    published_before = read_directory(data / "out")
    roots_in_use = {fingerprint(r) for r in published_before.bundles["trust-bundle.pem"]}
    (data / "state.json").unlink()

    code, output = run_once(running_local)
    assert "JOURNAL REBUILT" in output and "CreateRoot" not in output, output
    assert "root-1 (active)" in output
    assert "refusing to publish" not in output
    assert code == 0, output  # the root that signed the surviving credentials
    assert sorted(p.name for p in (data / "anchor").glob("root-*.crt")) == [
        "root-1.crt",
        "root-3.crt",
        "root-4.crt",
        "root-5.crt",
    ]
    record = json.loads((data / "state.json").read_text())["state"]
    roles = {r["ref"]: r["role"] for r in record["roots"]}
    assert roles == {
        "root-1": "active",
        "root-3": "retiring",
        "root-4": "retiring",
        "root-5": "retiring",
    }
    assert record["serial"] == 5 and record["phase"] == "retiring"
    published = read_directory(data / "out")
    bundle = {fingerprint(r) for r in published.bundles["trust-bundle.pem"]}
    assert roots_in_use <= bundle
    check_published(data / "out")
    # The next pass goes on from the rebuilt journal: nothing new, nothing dropped.
    code, output = run_once(running_local)
    assert code == 0, output
    assert "JOURNAL REBUILT" not in output and "CreateRoot" not in output
    check_published(data / "out")


def test_a_journal_lost_entirely_keeps_every_valid_root_trusted(running_local: Path) -> None:
    data = running_local.parent / "data"
    _extra_roots(data, ["root-3"])
    (data / "state.json").unlink()
    for record in (data / "state.d").rglob("*.json"):
        record.unlink()
    code, output = run_once(running_local)
    assert "JOURNAL REBUILT" in output and "CreateRoot" not in output, output
    assert "refusing to publish" not in output
    assert code == 0, output
    published = read_directory(data / "out")
    names = {r.subject.rfc4514_string() for r in published.bundles["trust-bundle.pem"]}
    assert len(published.bundles["trust-bundle.pem"]) == 2, names  # root-1 and root-3
    check_published(data / "out")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_state_records_owned_by_another_user_at_0644_are_repaired_not_lost(
    running_local: Path,
) -> None:
    # The test runs as root (a daemon running as root reads any owner's file): the mode
    # is what must be repaired, and nothing may be lost or rewritten.
    data = running_local.parent / "data"
    files = [data / "state.json", *sorted((data / "state.d").rglob("*.json"))]
    for path in files:
        os.chown(path, 12345, 12345)
        path.chmod(0o644)
    contents = {p: p.read_bytes() for p in files}
    code, output = run_once(running_local)
    assert code == 0, output
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert path.read_bytes() == contents[path] or path.name == "state.json"
    assert "repaired the mode" in output
    check_published(data / "out")


def test_journal_records_at_mode_0644_are_repaired(running_local: Path) -> None:
    data = running_local.parent / "data"
    files = [data / "state.json", *sorted((data / "state.d").rglob("*.json"))]
    for path in files:
        path.chmod(0o644)
    contents = {p: p.read_bytes() for p in files}
    code, output = run_once(running_local)
    assert code == 0, output
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert path.read_bytes() == contents[path]


@pytest.mark.parametrize("how", ["metadata-delete", "delete-latest", "destroy-latest"])
def test_a_deleted_kv_record_is_rebuilt_from_the_named_issuers(
    openbao: OpenBao, tmp_path: Path, how: str
) -> None:
    prefix = unique("lost")
    config = vault_config(tmp_path, openbao, prefix)
    first = run_daemon(config, "run", "--once")
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp_path / "data" / "out"
    before = {fingerprint(r) for r in read_directory(out).bundles["trust-bundle.pem"]}
    path = f"secret/ca-daemon/{prefix}"
    if how == "metadata-delete":
        openbao.cli("kv", "metadata", "delete", path)
    elif how == "delete-latest":
        openbao.cli("kv", "delete", path)
    else:
        version = bao_json(openbao, "kv", "metadata", "get", path)["data"]["current_version"]
        openbao.cli("kv", "destroy", f"-versions={version}", path)

    again = run_daemon(config, "run", "--once")
    output = again.stdout + again.stderr
    assert "JOURNAL REBUILT" in output and "CreateRoot" not in output, output
    # KV counts versions from 1 again after a metadata delete; the rebuilt journal's new
    # epoch still outranks what was published before: no operator step is needed.
    assert "refusing to publish" not in output, output
    assert again.returncode == 0, output
    with openbao.http() as http:
        info = http.request("LIST", f"/v1/{prefix}-root/issuers").json()["data"]["key_info"]
    root_names = sorted(v["issuer_name"] for v in info.values())
    assert root_names == ["root-1"], root_names  # never a second root, never a second root-1
    after = {fingerprint(r) for r in read_directory(out).bundles["trust-bundle.pem"]}
    assert before <= after
    check_published(out)


def _issuer_root(out: Path) -> str:
    """The subject of the root the published Linkerd issuer certificate is signed by."""
    published = read_directory(out)
    roots = published.bundles["trust-bundle.pem"]
    issuer = published.issuer
    assert issuer is not None
    (signer,) = [r for r in roots if directly_issued_by(issuer, r)]
    return signer.subject.rfc4514_string() + "/" + fingerprint(signer)


def test_a_journal_lost_mid_rotation_keeps_signing_with_the_default_root(
    openbao: OpenBao, tmp_path: Path
) -> None:
    """The journal (CA record and every credential record) is lost while a root rotation
    propagates: the next root exists in Vault but no verifier may trust it yet. The rebuild
    takes Vault's default issuer (still the old root: only activation moves it) as active,
    so nothing is issued under the next root."""
    prefix = unique("midrot")
    config = vault_config(tmp_path, openbao, prefix)
    first = run_daemon(config, "run", "--once")
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp_path / "data" / "out"
    signer_before = _issuer_root(out)
    engine = build_engine(load_settings(config))
    engine.request_rotation("trust-anchor", "test")
    assert engine.reconcile().ok
    record, _ = engine.journal.load_ca()
    assert record.phase.value == "propagating", record.phase  # waits out the delay now
    path = f"secret/ca-daemon/{prefix}"
    for name in bao_json(openbao, "kv", "list", f"{path}/shards"):
        openbao.cli("kv", "metadata", "delete", f"{path}/shards/{name}")
    openbao.cli("kv", "metadata", "delete", path)

    again = run_daemon(config, "run", "--once")
    output = again.stdout + again.stderr
    assert again.returncode == 0, output
    assert "JOURNAL REBUILT" in output and "root-1 (active)" in output, output
    assert "root-3 (retiring)" in output, output  # the next root: trusted, never signing
    assert _issuer_root(out) == signer_before  # re-issued, and under the old root
    check_published(out)


def test_several_roots_and_no_sign_of_the_active_one_stop_the_rebuild(
    running_local: Path,
) -> None:
    """No default noted in the anchor and no surviving credential: which root signs is
    unknown, and either guess can be an outage. The pass stops, says how to recover, and
    leaves what is published alone; naming the root lets it go on."""
    data = running_local.parent / "data"
    _extra_roots(data, ["root-3"])
    (data / "anchor" / DEFAULT_ROOT).unlink()
    (data / "state.json").unlink()
    for record in (data / "state.d").rglob("*.json"):
        record.unlink()
    published = snapshot(data / "out")

    code, output = run_once(running_local)
    assert code != 0
    assert "no sign of which was active" in output and "anchor/default-root" in output, output
    assert "CreateRoot" not in output
    assert snapshot(data / "out") == published

    (data / "anchor" / DEFAULT_ROOT).write_text("root-1\n")
    code, output = run_once(running_local)
    assert code == 0, output
    assert "root-1 (active)" in output and "root-3 (retiring)" in output, output
    check_published(data / "out")


def test_a_journal_lost_after_activation_keeps_the_new_root_active(tmp_path: Path) -> None:
    """Activation notes the new root as the local anchor's default (anchor/default-root,
    as Vault's default issuer): a journal lost entirely after it is rebuilt around the new
    root, not refused, and nothing is issued under the old one again."""
    config = local_config(tmp_path)
    doc = yaml.safe_load(config.read_text())
    doc["rotation"] = {"propagation_delay": "1s"}
    config.write_text(yaml.safe_dump(doc))
    code, output = run_once(config)
    assert code == 0, output
    data = tmp_path / "data"
    engine = build_engine(load_settings(config))
    engine.request_rotation("trust-anchor", "test")
    for _ in range(10):
        assert engine.reconcile().ok
        record, _ = engine.journal.load_ca()
        if record.phase.value == "retiring":
            break
        time.sleep(0.5)
    assert record.phase.value == "retiring", record.phase
    active = record.active_root
    assert active is not None and active.ref != "root-1"
    assert (data / "anchor" / DEFAULT_ROOT).read_text().strip() == active.ref
    (data / "state.json").unlink()
    for path in (data / "state.d").rglob("*.json"):
        path.unlink()

    code, output = run_once(config)
    assert code == 0, output
    assert f"{active.ref} (active)" in output and "root-1 (retiring)" in output, output
    published = read_directory(data / "out")
    assert published.issuer is not None
    assert directly_issued_by(published.issuer, active.cert)
    check_published(data / "out")
