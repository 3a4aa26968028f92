"""Upgrading from state version 1 or 2 keeps the root and every issued certificate.

tests/data/state-v1 was written by an earlier release (one state.json holding every
certificate and key, a flat out/ directory); version 2 kept one record per credential.
The current version moves them into a CA record and shard records, re-issues nothing,
and keeps publishing the same chain.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ca_daemon.anchor.vault.client import VaultClient
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import VaultAnchor, VaultAuth
from ca_daemon.journal.format import shard_of
from ca_daemon.journal.journal import Journal
from ca_daemon.journal.store.records import FileRecordStore
from ca_daemon.journal.store.vault_kv import VaultKvStore
from ca_daemon.model.state import STATE_VERSION
from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.pki.keys import load_private_key, private_key_pem
from ca_daemon.service.metrics import Metrics
from ca_daemon.service.service import DaemonService, JournalOffline, Leadership
from ca_daemon.service.wiring import build_engine
from tests.support.cli import ca_daemon
from tests.support.journal_files import credential_docs, shard_files
from tests.support.servers.openbao import OpenBao

pytestmark = pytest.mark.integration

V1 = Path(__file__).resolve().parents[1] / "data" / "state-v1"


def _v1_copy(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    shutil.copytree(V1, data, ignore=shutil.ignore_patterns("config.yaml", "README.md"))
    for key in [*data.glob("anchor/*.key"), data / "passphrase", data / "state.json"]:
        key.chmod(0o600)
    config = tmp_path / "config.yaml"
    config.write_text((V1 / "config.yaml").read_text().replace("DATA_DIR", str(data)))
    return data, config


def _v1_fingerprints(v1: dict[str, Any]) -> dict[str, str]:
    def fp(pem: str) -> str:
        return fingerprint(parse_pem_certificates(pem)[0])

    state = v1["state"]
    prints = {"root": fp(state["roots"][0]["cert"]), "issuer": fp(state["linkerd_issuer"]["cert"])}
    prints |= {name: fp(c["cert"]) for name, c in state["kong_clients"].items()}
    return prints


def _published(out: Path) -> dict[str, str]:
    def fp(path: Path) -> str:
        return fingerprint(parse_pem_certificates(path.read_bytes())[0])

    prints = {"root": fp(out / "trust-bundle.pem"), "issuer": fp(out / "linkerd" / "tls.crt")}
    for name in ("payments", "orders"):
        prints[name] = fp(out / "kong" / "clients" / name / "tls.crt")
    return prints


def test_upgrade_keeps_the_root_and_every_certificate(tmp_path: Path) -> None:
    data, config = _v1_copy(tmp_path)
    v1 = json.loads((data / "state.json").read_text())
    assert v1["state"]["version"] == 1
    before = _v1_fingerprints(v1)
    assert _published(data / "out") == before

    run = ca_daemon("run", "--once", "--config", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    # Nothing was created or re-issued: the upgrade is a change of layout only.
    assert "CreateRoot" not in run.stdout and "Issue" not in run.stdout, run.stdout
    assert _published(data / "out") == before

    record = json.loads((data / "state.json").read_text())["state"]
    assert record["version"] == STATE_VERSION
    assert "PRIVATE KEY" not in json.dumps(record)  # keys moved to the shard records
    assert [r["ref"] for r in record["roots"]] == ["root-1"]
    assert [i["ref"] for i in record["intermediates"]] == ["kong-2"]
    docs = credential_docs(data)
    assert sorted(docs) == ["kong/orders", "kong/payments", "linkerd-issuer"]
    assert all("BEGIN ENCRYPTED PRIVATE KEY" in doc["key"] for doc in docs.values())
    for path in shard_files(data):
        assert path.stat().st_mode & 0o777 == 0o600

    verify = ca_daemon("verify", "--config", str(config), cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    again = ca_daemon("run", "--once", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "Issue" not in again.stdout
    status = ca_daemon("status", "--json", "--config", str(config), cwd=tmp_path)
    view = json.loads(status.stdout)
    assert view["phase"] == "steady" and view["roots"][0]["fingerprint"] == before["root"]


def test_vault_journal_migrates_a_version_1_document(openbao: OpenBao, tmp_path: Path) -> None:
    """The previous release kept the same document in Vault KV (keys in the clear there);
    loading it splits it with check-and-set, so a second loader cannot migrate twice."""
    data, _ = _v1_copy(tmp_path)
    passphrase = (data / "passphrase").read_bytes().strip()
    v1 = json.loads((data / "state.json").read_text())["state"]
    for entry in [v1["linkerd_issuer"], *v1["kong_clients"].values()]:
        entry["key"] = private_key_pem(load_private_key(entry["key"].encode(), passphrase)).decode()
    admin = VaultClient(VaultAnchor(address=openbao.address, auth=VaultAuth(token=openbao.token)))
    path = "ca-daemon/migrate-test"
    openbao.cli("secrets", "enable", "-path=kv-migrate", "-version=2", "kv", check=False)
    admin.write(f"kv-migrate/data/{path}", "seed", {"data": {"state": v1}})

    journal = Journal(VaultKvStore(admin, "kv-migrate", path))
    loaded = journal.load()
    state = loaded.state
    assert [r.ref for r in state.ca.roots] == ["root-1"]
    assert state.ca.active_intermediate is not None
    assert sorted(state.kong_clients) == ["orders", "payments"]
    assert state.linkerd_issuer is not None
    assert fingerprint(state.linkerd_issuer.cert) == _v1_fingerprints({"state": v1})["issuer"]
    assert loaded.version == 2  # version 1 was the old document
    stored = admin.read(f"kv-migrate/data/{path}", "read")
    assert stored is not None and stored["data"]["state"]["version"] == STATE_VERSION
    listed = admin.request("LIST", f"kv-migrate/metadata/{path}/shards/", "list")
    wanted = {shard_of(k) for k in ("kong/orders", "kong/payments", "linkerd-issuer")}
    assert {f"shards/{k}" for k in listed["data"]["keys"]} == wanted
    # A second load sees the current version and migrates nothing again.
    assert journal.load().version == 2


def _as_version_2(data: Path, record_version: int) -> dict[str, dict[str, Any]]:
    """Lay a current journal out as version 2 wrote it: the CA record at version 2 and one
    record per credential (each at ``record_version``), no shards. The documents moved."""
    store = FileRecordStore(data)
    docs = credential_docs(data)
    found = store.read("")
    assert found is not None
    store.write("", {**found[0], "version": 2}, found[1])
    for key, doc in docs.items():
        legacy = {k: v for k, v in doc.items() if k != "revision"} | {"version": 2}
        name = f"credentials/{key.replace('/', '.')}"
        for version in range(record_version):
            store.write(name, legacy, version)
    for path in shard_files(data):
        path.unlink()
    return docs


def test_upgrade_from_version_2_moves_each_record_into_its_shard(tmp_path: Path) -> None:
    data, config = _v1_copy(tmp_path)
    assert ca_daemon("run", "--once", "--config", str(config), cwd=tmp_path).returncode == 0
    before = _published(data / "out")
    docs = _as_version_2(data, record_version=4)
    assert not shard_files(data) and len(list(data.glob("state.d/credentials/*.json"))) == 3

    run = ca_daemon("run", "--once", "--config", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Issue" not in run.stdout and "CreateRoot" not in run.stdout, run.stdout
    assert _published(data / "out") == before
    assert json.loads((data / "state.json").read_text())["state"]["version"] == STATE_VERSION
    migrated = credential_docs(data)
    assert sorted(migrated) == sorted(docs)
    for key, doc in migrated.items():
        # Sealed keys are moved as they were; the record's version becomes the revision,
        # so no published generation goes backwards.
        assert (doc["key"], doc["cert"], doc["revision"]) == (
            docs[key]["key"],
            docs[key]["cert"],
            4,
        )
    assert not list(data.glob("state.d/credentials/*.json"))  # the old records are gone
    verify = ca_daemon("verify", "--config", str(config), cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_standby_reads_an_older_layout_without_moving_it(tmp_path: Path) -> None:
    """A rolling upgrade: the new release's standby shows the state from the version-2
    records but writes nothing; only the leader's pass moves them."""
    data, config = _v1_copy(tmp_path)
    assert ca_daemon("run", "--once", "--config", str(config), cwd=tmp_path).returncode == 0
    docs = _as_version_2(data, record_version=2)
    files = {p: p.read_bytes() for p in data.glob("state*") if p.is_file()}
    files |= {p: p.read_bytes() for p in data.glob("state.d/**/*.json")}
    settings = load_settings(config)
    service = DaemonService(settings, build_engine(settings), Metrics(), lambda: datetime.now(UTC))
    service.leadership = Leadership(leader=False, holder="the-old-release")
    standby = service.tick()
    assert standby.ok, standby.errors
    assert standby.state is not None
    assert sorted(k for k, _ in standby.state.credentials()) == sorted(docs)
    assert service.status()["phase"] == "steady"
    # A request asked of the standby: a dry run is answered; the request itself would be
    # written over a layout moved in memory only, so it is refused (503), never moved.
    assert service.dry_run("kong", "via the standby")["steps"]
    with pytest.raises(JournalOffline, match="older layout, which only the leader moves"):
        service.request("kong", "via the standby")
    after = {p: p.read_bytes() for p in data.glob("state*") if p.is_file()}
    after |= {p: p.read_bytes() for p in data.glob("state.d/**/*.json")}
    assert after == files  # nothing moved, nothing written

    service.leadership = Leadership(leader=True)
    assert service.tick().ok
    assert json.loads((data / "state.json").read_text())["state"]["version"] == STATE_VERSION
    assert sorted(credential_docs(data)) == sorted(docs)
    assert not list(data.glob("state.d/credentials/*.json"))

    # Moved: the standby's request is journaled, and it writes nothing but the CA record.
    service.leadership = Leadership(leader=False, holder="the-new-leader")
    shards = {p: p.read_bytes() for p in data.glob("state.d/**/*.json")}
    op_id = service.request("kong", "via the standby")
    assert {p: p.read_bytes() for p in data.glob("state.d/**/*.json")} == shards
    assert service.operation(op_id) is not None
