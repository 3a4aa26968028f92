"""The embedded default as a careless or hostile operator meets it (issue 13).

Contained failures, loose modes, umasks, read-only commands, a symlinked ``out/``,
what `verify` must catch, and expired or nearly expired certificates. No message
may carry a key or the passphrase.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from ca_daemon.anchor.local import load_or_create_passphrase
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.journal.format import shard_of
from ca_daemon.journal.open import file_journal
from ca_daemon.model.generation import parse_generation
from ca_daemon.model.world import desired_world
from ca_daemon.pki.bundle import certificate_pem, stable_id
from ca_daemon.pki.keys import load_private_key, private_key_pem
from ca_daemon.publish.directory import GENERATION, DirectoryPublisher
from ca_daemon.report.verify import verify_published
from ca_daemon.rotation.engine import Engine
from ca_daemon.service.wiring import build_engine
from tests.support.cli import ca_daemon, daemon_env
from tests.support.key_leaks import leaked
from tests.support.pki import self_signed_root
from tests.support.refusing_anchor import RefusesBroken

pytestmark = pytest.mark.integration

DATA = "ca-daemon-data"
V1 = Path(__file__).parents[1] / "data" / "state-v1"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CA_DAEMON_") or name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("laptop")
    result = ca_daemon("run", "--once", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return workdir


def _copy(published: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(published, copy, symlinks=True)  # out/ keeps its ..data symlinks
    return copy


def secrets_in(workdir: Path) -> list[bytes]:
    """Every key (encrypted as stored, and in the clear) and the passphrase of a workdir."""
    data = workdir / DATA
    passphrase = (data / "passphrase").read_bytes().strip()
    sealed = [p.read_bytes() for p in data.glob("anchor/*.key")]
    keys = sealed + [private_key_pem(load_private_key(k, passphrase)) for k in sealed]
    keys += [p.read_bytes() for p in (data / "out").rglob("*.key")]
    for link in ("linkerd/tls.key", "kong/clients/example/tls.key"):
        if (data / "out" / link).is_file():
            keys.append((data / "out" / link).read_bytes())
    return [passphrase, *keys]


def assert_no_secret(text: str, workdir: Path) -> None:
    passphrase, *keys = secrets_in(workdir)
    assert passphrase.decode() not in text
    assert "PRIVATE KEY" not in text
    assert leaked(text, *keys) == []


def _settings(tmp_path: Path, config: dict[str, Any]) -> tuple[Settings, Path]:
    data: dict[str, Any] = {
        "anchor": {"local": {"dir": str(tmp_path / DATA)}},
        "publish": {"kubernetes": {"enabled": False}},
    }
    data.update(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_settings(path), path


# --- point 3: one credential that cannot be issued ----------------------------------------

CLIENTS = {
    "kong": {
        "clients": [
            {"name": "payments", "common_name": "kong.payments.upstream"},
            {"name": "broken", "common_name": "kong.broken.upstream"},
            {"name": "orders", "common_name": "kong.orders.upstream"},
        ]
    }
}


def test_one_client_that_cannot_be_issued_does_not_stop_the_others(tmp_path: Path) -> None:
    settings, _ = _settings(tmp_path, CLIENTS)
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    journal = file_journal(settings, passphrase)
    out = settings.publish_directory
    engine = Engine(
        settings,
        RefusesBroken(settings.anchor.local.dir, passphrase),
        journal,
        [DirectoryPublisher(out)],
    )
    now = datetime.now(UTC)
    result = engine.reconcile(now=now)
    assert result.errors == ["kong-client broken: the anchor refuses kong.broken.upstream"]
    failed = [(s.name, s.ok) for s in result.steps if s.kind.value == "kong-client"]
    assert sorted(failed) == [("broken", False), ("orders", True), ("payments", True)]
    # The Linkerd issuer and the other clients are published ...
    for rel in ("linkerd/tls.crt", "kong/clients/payments/tls.crt", "kong/clients/orders/tls.crt"):
        assert (out / rel).is_file(), rel
    assert not (out / "kong/clients/broken").exists()
    # ... the journal holds exactly what is published ...
    state = journal.load().state
    assert state.linkerd_issuer is not None and sorted(state.kong_clients) == ["orders", "payments"]
    for name, entry in state.kong_clients.items():
        published = x509.load_pem_x509_certificates(
            (out / f"kong/clients/{name}/tls.crt").read_bytes()
        )
        assert published[0] == entry.cert
    assert x509.load_pem_x509_certificate((out / "linkerd/tls.crt").read_bytes()) == (
        state.linkerd_issuer.cert
    )
    # ... and verify, checking the files against journal and configuration, sees only the gap.
    report = verify_published(settings, out, now)
    assert report.problems == [
        f"kong client broken: {out}/kong/clients/broken is missing, but it is configured"
    ]


def test_run_once_reports_the_client_it_could_not_issue_and_exits_1(tmp_path: Path) -> None:
    _, config = _settings(tmp_path, CLIENTS)
    script = (
        "import sys\n"
        "import ca_daemon.journal.open as opening\n"
        "from tests.support.refusing_anchor import RefusesBroken\n"
        "opening.LocalAnchor = RefusesBroken\n"
        "from ca_daemon.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, "run", "--once", "--config", str(config)],
        cwd=Path(__file__).parents[2],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "IssueKongClient kong-client broken (missing): FAILED" in run.stdout
    assert "IssueKongClient kong-client orders (missing): ok" in run.stdout
    assert "error: kong-client broken: the anchor refuses kong.broken.upstream" in run.stderr
    assert_no_secret(run.stdout + run.stderr, tmp_path)


# --- point 4: loose modes and umasks ---------------------------------------------------------

SECRETS = [
    "anchor/root-1.key",
    "anchor/kong-2.key",
    "state.json",
    f"state.d/{shard_of('linkerd-issuer')}.json",
    f"state.d/{shard_of('kong/example')}.json",
    "passphrase",
    "api-token",
]


@pytest.mark.parametrize("rel", SECRETS)
def test_a_secret_readable_by_others_is_reported_then_repaired(
    published: Path, tmp_path: Path, rel: str
) -> None:
    copy = _copy(published, tmp_path)
    path = copy / DATA / rel
    if rel == "api-token":
        path.write_text("not-a-real-token\n")
    path.chmod(0o644)
    shown = f"{DATA}/{rel}"

    verify = ca_daemon("verify", cwd=copy)
    assert verify.returncode == 1
    assert (
        f"PROBLEM {shown}: secret file is open to other users (mode 0644, must be 0600)"
        in verify.stdout
    )
    assert path.stat().st_mode & 0o777 == 0o644  # verify repairs nothing: it writes nothing

    run = ca_daemon("run", "--once", cwd=copy)
    assert run.returncode == 0, run.stderr
    assert (
        f"repaired the mode of a secret: {shown}: was mode 0644, open to other users; now 0600"
        in run.stderr
    )
    assert path.stat().st_mode & 0o777 == 0o600
    assert ca_daemon("verify", cwd=copy).returncode == 0
    assert_no_secret(verify.stdout + verify.stderr + run.stdout + run.stderr, copy)


@pytest.mark.parametrize("rel", ["anchor", "state.d", "state.d/shards"])
def test_a_private_directory_open_to_others_is_reported_then_repaired(
    published: Path, tmp_path: Path, rel: str
) -> None:
    copy = _copy(published, tmp_path)
    (copy / DATA / rel).chmod(0o755)
    verify = ca_daemon("verify", cwd=copy)
    assert verify.returncode == 1
    assert f"{DATA}/{rel}: private directory is open to other users (mode 0755" in verify.stdout
    assert ca_daemon("run", "--once", cwd=copy).returncode == 0
    assert (copy / DATA / rel).stat().st_mode & 0o777 == 0o700


def _modes(workdir: Path) -> dict[str, int]:
    """Mode of everything under the data directory, following out/ into ..data."""
    data = workdir / DATA
    found = {".": data.stat().st_mode & 0o777}
    for dirpath, dirs, files in os.walk(data, followlinks=True):
        for name in [*dirs, *files]:
            path = Path(dirpath) / name
            rel = path.relative_to(data).as_posix()
            if "/.." in f"/{rel}" and not rel.startswith("out/..data"):
                continue  # the version directory itself, seen through ..data
            found[rel] = path.stat().st_mode & 0o777
    return found


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o022])
def test_modes_do_not_depend_on_the_umask(tmp_path: Path, umask: int) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "ca_daemon", "run", "--once"],
        cwd=tmp_path,
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(umask),
    )
    assert run.returncode == 0, run.stderr
    modes = _modes(tmp_path)
    private = [".", "anchor", "state.d", "state.d/shards"]
    assert {rel: modes[rel] for rel in private} == dict.fromkeys(private, 0o700)
    secrets = ["passphrase", "state.json", "daemon.lock", "state.lock"]
    secrets += [r for r in modes if r.endswith((".key", ".json"))]
    assert {r: modes[r] for r in secrets} == dict.fromkeys(secrets, 0o600)
    published = {r: m for r, m in modes.items() if r.startswith("out")}
    dirs = [r for r in published if (tmp_path / DATA / r).is_dir()]
    assert len(dirs) > 5
    assert {r: published[r] for r in dirs} == dict.fromkeys(dirs, 0o755)
    certs = [r for r in published if r.endswith((".crt", ".pem")) or r.startswith("anchor/")]
    assert {r: published[r] for r in certs} == dict.fromkeys(certs, 0o644)
    assert ca_daemon("verify", cwd=tmp_path).returncode == 0


# --- point 6: read-only commands -------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry below root: mode, mtime, and content (or symlink target)."""
    seen = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(dirpath) / name
            info = path.lstat()
            if path.is_symlink():
                content = os.readlink(path).encode()
            elif path.is_file():
                content = path.read_bytes()
            else:
                content = b""
            seen[str(path.relative_to(root))] = (info.st_mode, info.st_mtime_ns, content)
    return seen


READ_ONLY = [("status",), ("status", "--json"), ("verify",), ("config", "check")]


def test_read_only_commands_write_nothing_in_an_empty_directory(tmp_path: Path) -> None:
    for command in READ_ONLY:
        result = ca_daemon(*command, cwd=tmp_path)
        assert list(tmp_path.iterdir()) == [], command
        if command[0] == "status":
            assert result.returncode == 1
            assert "error: no state yet" in result.stderr
            assert "run `ca-daemon run --once` first" in result.stderr
        elif command[0] == "verify":
            assert result.returncode == 1
            assert "no journal to check the published files against" in result.stdout
        else:
            assert result.returncode == 0


def test_read_only_commands_write_nothing_over_a_published_directory(
    published: Path, tmp_path: Path
) -> None:
    copy = _copy(published, tmp_path)
    before = _snapshot(copy)
    for command in READ_ONLY:
        result = ca_daemon(*command, cwd=copy)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        assert _snapshot(copy) == before, command


def test_status_reads_a_version_1_state_without_migrating_it_on_disk(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(V1, data, ignore=shutil.ignore_patterns("config.yaml", "README.md"))
    for key in [*data.glob("anchor/*.key"), data / "passphrase", data / "state.json"]:
        key.chmod(0o600)
    config = tmp_path / "config.yaml"
    config.write_text((V1 / "config.yaml").read_text().replace("DATA_DIR", str(data)))
    before = _snapshot(tmp_path)
    for command in [("status", "--json"), ("verify",)]:
        result = ca_daemon(*command, "--config", str(config), cwd=tmp_path)
        assert "Traceback" not in result.stderr, result.stderr
        assert _snapshot(tmp_path) == before, command
    status = ca_daemon("status", "--json", "--config", str(config), cwd=tmp_path)
    assert '"root-1"' in status.stdout  # read through the migration, in memory
    assert not (data / "state.d").exists()


# --- point 6: a symlinked or foreign out/ ----------------------------------------------------


def test_a_symlinked_out_is_refused_and_nothing_in_it_is_touched(tmp_path: Path) -> None:
    foreign = tmp_path / "someone-else"
    for rel in ("kong/clients/x/notes.txt", "trust-bundle.pem", "..2020_01_01_00_00_00.x/keep"):
        (foreign / rel).parent.mkdir(parents=True, exist_ok=True)
        (foreign / rel).write_text("theirs\n")
    before = _snapshot(foreign)
    (tmp_path / DATA).mkdir(mode=0o700)
    (tmp_path / DATA / "out").symlink_to(foreign)
    run = ca_daemon("run", "--once", cwd=tmp_path)
    assert run.returncode == 1
    assert (
        f"publish to directory {DATA}/out: {DATA}/out: is a symlink (to {foreign}): "
        "refusing to publish through it" in run.stderr
    )
    assert _snapshot(foreign) == before
    assert_no_secret(run.stdout + run.stderr, tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_an_out_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    out = tmp_path / DATA / "out"
    out.mkdir(parents=True)
    (out / "trust-bundle.pem").write_text("theirs\n")
    os.chown(out, 12345, 12345)
    run = ca_daemon("run", "--once", cwd=tmp_path)
    assert run.returncode == 1
    assert f"{DATA}/out: is owned by uid 12345, not this daemon's uid 0" in run.stderr
    assert (out / "trust-bundle.pem").read_text() == "theirs\n"


# --- point 1: publishing never goes back to an older journal version -----------------------


def test_the_directory_publisher_refuses_an_older_journal_version(
    published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = _copy(published, tmp_path)
    monkeypatch.chdir(copy)
    settings = load_settings(None)  # the embedded default, in the copy
    data, out = copy / DATA, copy / DATA / "out"
    loaded = file_journal(settings, (data / "passphrase").read_bytes().strip()).load()
    epoch, recorded, _ = parse_generation((out / GENERATION).read_text())
    # Published from the version before the journal noted that publish (published_at).
    assert epoch == 0 and recorded == loaded.version - 1 > 0
    world = desired_world(loaded.state, settings, recorded)
    before = _snapshot(out)

    older = replace(world, kong_clients={}, generation=recorded - 1)
    report = DirectoryPublisher(out).publish(older)
    assert report.errors == {
        GENERATION: f"refusing to publish journal generation 0.{recorded - 1}.0: 0.{recorded}.0 "
        f"is already published (a newer pass published first; if the journal was reset on "
        f"purpose, remove {out / GENERATION})"
    }
    assert _snapshot(out) == before  # the client is still published

    # A newer journal with nothing new to publish leaves even the marker alone...
    same = replace(world, generation=recorded + 1)
    report = DirectoryPublisher(out).publish(same)
    assert (report.changed, report.errors) == ([], {})
    assert _snapshot(out) == before
    # ...and moves it on with new content.
    newer = replace(world, kong_clients={}, generation=recorded + 1)
    assert DirectoryPublisher(out).publish(newer).errors == {}
    assert (out / GENERATION).read_text() == f"0.{recorded + 1}.0\n"


def test_run_once_behind_what_is_published_refuses_to_publish(
    published: Path, tmp_path: Path
) -> None:
    copy = _copy(published, tmp_path)
    generation = copy / DATA / "out" / GENERATION
    epoch, version, _ = parse_generation(generation.read_text())
    ahead = f"{epoch}.{version + 10}.0"  # as if another process were ahead
    generation.write_text(f"{ahead}\n")
    run = ca_daemon("run", "--once", cwd=copy)
    assert run.returncode == 1
    assert f"{ahead} is already published" in run.stderr


# --- point 5: what verify must catch ---------------------------------------------------------


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


def _plant_root(out: Path) -> None:
    _, root = self_signed_root("planted", now=datetime.now(UTC))
    _append(out / "trust-bundle.pem", certificate_pem(root).encode())  # every ca.crt too
    (out / "kong" / "ca" / f"{stable_id(root)}.pem").write_text(certificate_pem(root))


INCOMPLETE = b"-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAKHBfpegPjMCMA0GCSqGSIb3DQEBCwUA\n"
TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    "bundle: incomplete block": (
        lambda out: _append(out / "trust-bundle.pem", INCOMPLETE),
        "trust-bundle.pem: not a PEM certificate: line {} holds an incomplete CERTIFICATE block",
    ),
    "bundle: garbage after the last block": (
        lambda out: _append(out / "trust-bundle.pem", b"garbage\n"),
        "trust-bundle.pem: not a PEM certificate: line {} holds text that is not part of",
    ),
    "issuer: incomplete block": (
        lambda out: _append(out / "linkerd/tls.crt", INCOMPLETE),
        "linkerd issuer certificate: not a PEM certificate: line {} holds an incomplete",
    ),
    "issuer: garbage after the last block": (
        lambda out: _append(out / "linkerd/tls.crt", b"\n}\n"),
        "linkerd issuer certificate: not a PEM certificate: line {} holds text",
    ),
    "issuer: its key pasted after it": (
        lambda out: _append(out / "linkerd/tls.crt", (out / "linkerd/tls.key").read_bytes()),
        "linkerd issuer certificate: not a PEM certificate: line {} holds a private key block",
    ),
    "no linkerd/": (
        lambda out: (out / "linkerd").unlink(),
        f"{DATA}/out/linkerd: missing, but linkerd is enabled",
    ),
    "no kong/": (
        lambda out: (out / "kong").unlink(),
        f"{DATA}/out/kong: missing, but kong is enabled",
    ),
    "no client directory": (
        lambda out: shutil.rmtree(out / "kong/clients/example"),
        f"kong client example: {DATA}/out/kong/clients/example is missing, but it is configured",
    ),
    "a planted root in the bundle and kong/ca": (
        _plant_root,
        "is not a root the journal knows (a planted trust anchor?)",
    ),
}


@pytest.mark.parametrize(("tamper", "problem"), TAMPERING.values(), ids=TAMPERING.keys())
def test_verify_names_what_linkerd_or_kong_would_refuse_or_miss(
    published: Path, tmp_path: Path, tamper: Callable[[Path], None], problem: str
) -> None:
    copy = _copy(published, tmp_path)
    tamper(copy / DATA / "out")
    result = ca_daemon("verify", cwd=copy)
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM ")]
    pattern = re.compile(re.escape(problem).replace(re.escape("{}"), r"\d+"))  # {}: a line
    assert any(pattern.search(line) for line in problems), result.stdout
    assert "Traceback" not in result.stderr
    assert_no_secret(result.stdout + result.stderr, copy)


# --- point 7: expired, and nearly expired ---------------------------------------------------


def _journal_made_at(tmp_path: Path, when: datetime, config: dict[str, Any]) -> Path:
    """A data directory whose every certificate was issued at ``when``."""
    settings, path = _settings(tmp_path, config)
    result = build_engine(settings).reconcile(now=when)
    assert result.ok, result.errors
    return path


def test_an_expired_root_fails_run_status_and_verify(tmp_path: Path) -> None:
    one_client = {"kong": {"clients": [{"name": "example", "common_name": "kong.example"}]}}
    config = _journal_made_at(tmp_path, datetime.now(UTC) - timedelta(days=400), one_client)
    status = ca_daemon("status", "--config", str(config), cwd=tmp_path)
    assert status.returncode == 1
    assert "error: trust anchor root-1 (active) expired at" in status.stderr
    assert "error: linkerd issuer linkerd-identity-issuer expired at" in status.stderr
    assert "error: kong intermediate kong-2 expired at" in status.stderr
    assert "error: kong client example expired at" in status.stderr
    assert "EXPIRED" in status.stdout

    verify = ca_daemon("verify", "--config", str(config), cwd=tmp_path)
    assert verify.returncode == 1
    assert "PROBLEM trust-bundle.pem: root " in verify.stdout and " expired at " in verify.stdout

    run = ca_daemon("run", "--once", "--config", str(config), cwd=tmp_path)
    assert run.returncode == 1
    assert "error: trust anchor root-1 (active) expired at" in run.stderr
    assert "Traceback" not in run.stderr
    assert_no_secret(status.stdout + status.stderr + verify.stdout + run.stderr, tmp_path)


def test_a_steady_root_inside_rotate_before_is_a_warning_in_status(tmp_path: Path) -> None:
    only_root = {"linkerd": {"enabled": False}, "kong": {"enabled": False}}
    # root.lifetime 8760h, rotate_before 2920h: 10 days inside the margin.
    made = datetime.now(UTC) - timedelta(hours=8760 - 2920 + 240)
    config = _journal_made_at(tmp_path, made, only_root)
    status = ca_daemon("status", "--config", str(config), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "warning: trust anchor root-1 expires at " in status.stderr
    assert "inside root.rotate_before, and no root rotation has started" in status.stderr

    run = ca_daemon("run", "--once", "--config", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PrepareRoot" in run.stdout  # the engine starts the rotation ...
    status = ca_daemon("status", "--config", str(config), cwd=tmp_path)
    assert status.returncode == 0
    assert "warning" not in status.stderr  # ... and a root near its end is then expected
    assert "rotation phase: steady" not in status.stdout
