"""The directory publisher swaps the whole set at once, as the kubelet's AtomicWriter does."""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from ca_daemon.model.state import IssuedEntry
from ca_daemon.model.world import TrustWorld
from ca_daemon.pki.bundle import certificate_pem
from ca_daemon.pki.keys import PrivateKey, generate_key, private_key_pem
from ca_daemon.pki.profiles import Kind, Subject, capped_validity, sign_certificate
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.report.verify import verify_directory
from tests.support.clock import NOW
from tests.support.pki import self_signed_root
from tests.support.published_files import documented_files

pytestmark = pytest.mark.integration

RENEWALS = 100
TOP_LEVEL = {"trust-bundle.pem", "linkerd", "kong"}


def _issue(
    kind: Kind, cn: str, signer_key: PrivateKey, signer: x509.Certificate
) -> tuple[PrivateKey, x509.Certificate]:
    key = generate_key()
    validity = capped_validity(NOW, timedelta(days=30), None)
    subject = Subject(cn, dns_names=(f"{cn}.example",))
    return key, sign_certificate(kind, subject, key.public_key(), signer_key, signer, validity)


@dataclass
class Pki:
    """One root with its Kong intermediate, to issue from."""

    generation: int

    def __post_init__(self) -> None:
        self.root_key, self.root = self_signed_root(f"root-{self.generation}")
        self.inter_key, self.inter = _issue(
            Kind.KONG_INTERMEDIATE, f"kong-{self.generation}", self.root_key, self.root
        )

    def client(self, name: str) -> IssuedEntry:
        key, cert = _issue(Kind.KONG_CLIENT, name, self.inter_key, self.inter)
        return IssuedEntry(
            cert=cert, key=private_key_pem(key), signer_ref="kong", chain=(self.inter,)
        )

    def world(self, clients: tuple[str, ...] = ("payments", "orders")) -> TrustWorld:
        key, issuer = _issue(Kind.LINKERD_ISSUER, "identity.linkerd", self.root_key, self.root)
        return TrustWorld(
            roots=(self.root,),
            linkerd_issuer=IssuedEntry(cert=issuer, key=private_key_pem(key), signer_ref="r"),
            kong_clients={name: self.client(name) for name in clients},
        )


def make_world(generation: int, clients: tuple[str, ...] = ("payments", "orders")) -> TrustWorld:
    """A world under a root of its own: a file of one world beside one of another never chains."""
    return Pki(generation).world(clients)


def data_target(out: Path) -> str | None:
    try:
        return os.readlink(out / "..data")
    except OSError:
        return None


def versions(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.name.startswith("..20")}


def assert_layout(out: Path, world: TrustWorld) -> None:
    for name in TOP_LEVEL:
        assert os.readlink(out / name) == f"..data/{name}", name
    files = documented_files(out)
    assert {f for f in files if f.startswith("kong/clients/")} == {
        f"kong/clients/{n}/{f}"
        for n in world.kong_clients
        for f in ("tls.crt", "tls.key", "ca.crt")
    }
    assert {"trust-bundle.pem", "linkerd/ca.crt", "linkerd/tls.crt", "linkerd/tls.key"} <= set(
        files
    )
    for rel, mode in files.items():
        assert mode == (0o600 if rel.endswith(".key") else 0o644), rel
    for directory in ("linkerd", "kong", "kong/ca", "kong/clients", "kong/clients/payments"):
        assert stat.S_IMODE((out / directory).stat().st_mode) == 0o755, directory


@dataclass
class Reader:
    """Polls the documented paths in a tight loop and checks each set as verify does."""

    out: Path
    stop: threading.Event = field(default_factory=threading.Event)
    consistent: int = 0
    torn: int = 0  # ..data moved while reading: a careful reader reads again
    problems: list[str] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.is_set():
            before = data_target(self.out)
            try:
                report = verify_directory(self.out, NOW)
            except OSError:
                report = None  # the swapped-out version was removed under us
            if data_target(self.out) != before:
                self.torn += 1
                continue
            if report is None:
                raise AssertionError("a file vanished while ..data stayed")
            self.consistent += 1
            if not report.ok:
                self.problems += report.problems
                return


def test_a_reader_never_sees_a_mixed_set_during_renewals(tmp_path: Path) -> None:
    out = tmp_path / "out"
    publisher = DirectoryPublisher(out)
    worlds = [
        # A client comes and goes: its directory must vanish with the set that lacks it.
        make_world(i, ("payments", "orders") if i % 2 else ("payments", "orders", "billing"))
        for i in range(RENEWALS)
    ]
    publisher.publish(worlds[0])
    reader = Reader(out)
    thread = threading.Thread(target=reader.run, daemon=True)
    thread.start()
    try:
        for world in worlds[1:]:
            report = publisher.publish(world)
            assert "linkerd/tls.key" in report.changed
            assert_layout(out, world)
            assert len(versions(out)) == 1
    finally:
        reader.stop.set()
        thread.join(timeout=30)
    assert reader.problems == []
    # The reader really ran alongside the renewals, not only before or after them.
    assert reader.consistent >= 20, (reader.consistent, reader.torn)
    print(f"reader: {reader.consistent} consistent reads, {reader.torn} retried")
    last = worlds[-1].linkerd_issuer
    assert last is not None
    assert (out / "linkerd" / "tls.crt").read_text() == certificate_pem(last.cert)


def test_an_unchanged_world_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    publisher = DirectoryPublisher(out)
    world = make_world(0)
    first = publisher.publish(world)
    assert "trust-bundle.pem" in first.changed
    target = data_target(out)
    inodes = {p: p.stat().st_ino for p in (out / "..data").rglob("*")}
    again = publisher.publish(world)
    assert again.changed == []
    assert data_target(out) == target
    assert {p: p.stat().st_ino for p in (out / "..data").rglob("*")} == inodes
    assert versions(out) == {target}


def test_old_versions_are_removed_and_unchanged_files_are_linked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    publisher = DirectoryPublisher(out)
    pki = Pki(0)
    world = pki.world()
    publisher.publish(world)
    first = data_target(out)
    payments = (out / "kong/clients/payments/tls.key").stat().st_ino
    # A crash may leave a half-written version and a ..data_tmp behind.
    (out / "..2020_01_01_00_00_00.crashed").mkdir()
    (out / "..data_tmp").symlink_to("..2020_01_01_00_00_00.crashed")
    renewed = {**world.kong_clients, "orders": pki.client("orders")}
    report = publisher.publish(replace(world, kong_clients=renewed))
    assert report.changed == ["kong/clients/orders/tls.crt", "kong/clients/orders/tls.key"]
    assert data_target(out) != first
    assert versions(out) == {data_target(out)}
    assert not (out / "..data_tmp").is_symlink()
    # One renewal among many clients writes that client's files only.
    assert (out / "kong/clients/payments/tls.key").stat().st_ino == payments
    assert verify_directory(out, NOW).ok


def test_stale_clients_roots_and_linkerd_disappear(tmp_path: Path) -> None:
    out = tmp_path / "out"
    publisher = DirectoryPublisher(out)
    world = make_world(0)
    publisher.publish(world)
    smaller = replace(
        world,
        roots=make_world(1, ()).roots,
        linkerd_issuer=None,
        kong_clients={"payments": world.kong_clients["payments"]},
    )
    report = publisher.publish(smaller)
    assert "kong/clients/orders/tls.key" in report.changed
    assert "linkerd" in report.changed
    assert not (out / "kong/clients/orders").exists()
    assert not (out / "linkerd").is_symlink() and not (out / "linkerd").exists()
    assert len(list((out / "kong" / "ca").glob("*.pem"))) == 1


def test_the_flat_layout_of_an_older_version_is_migrated(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = make_world(0, ("payments", "gone"))
    # What an older ca-daemon left: real files and directories at the documented paths.
    for rel, content in {
        "trust-bundle.pem": old.bundle_pem.encode(),
        "linkerd/tls.crt": b"old",
        "linkerd/tls.key": b"old",
        "kong/clients/gone/tls.key": b"old",
    }.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(content)
    world = make_world(1)
    DirectoryPublisher(out).publish(world)
    assert_layout(out, world)
    assert not (out / "kong/clients/gone").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([*TOP_LEVEL, "..data", *versions(out)])
    assert verify_directory(out, NOW).ok


@pytest.mark.parametrize(
    "theirs",
    [
        {"passwd": b"root:x:0:0", "kong/kong.conf": b"admin_listen = 0.0.0.0:8001"},
        {"kong/kong.conf": b"admin_listen = 0.0.0.0:8001"},  # an owned name, not our layout
        {"notes.txt": b"mine"},
    ],
    ids=["an-etc", "a-kong-config", "a-stray-file"],
)
def test_a_directory_someone_else_filled_is_refused_and_left_alone(
    tmp_path: Path, theirs: dict[str, bytes]
) -> None:
    out = tmp_path / "out"
    for rel, content in theirs.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(content)
    report = DirectoryPublisher(out).publish(make_world(1))
    assert "holds files ca-daemon did not write" in report.errors[str(out)]
    assert not report.bundle_confirmed
    assert {
        str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()
    } == theirs


def test_an_empty_volume_with_lost_and_found_is_published_into(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "lost+found").mkdir(parents=True)
    world = make_world(1)
    report = DirectoryPublisher(out).publish(world)
    assert report.errors == {}
    assert_layout(out, world)
    assert (out / "lost+found").is_dir()
