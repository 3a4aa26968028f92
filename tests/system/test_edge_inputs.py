"""Bad input at the edges: clear error, nothing lost, nothing else blocked.

Against the real kube-apiserver and the real filesystem. What each case is, and what
was decided (docs/recovery.md, "Bad input at the edges", says the same for operators):

- A published object edited into garbage — bytes that are not PEM (text, and bytes
  that are not even UTF-8), a valid PEM of another key type (RSA, Ed25519), an expired
  certificate with its key pasted back — in the Linkerd issuer Secret, the trust-roots
  ConfigMap, a Kong client Secret, or a file of the directory publisher. Published
  objects are never read back into the journal: the next pass restores each from the
  journal, reports it as drift (log, ``ca_daemon_drift{target}``, a Warning Event in
  Kubernetes), and reconciles every other object in the same pass; the journal is not
  touched.
- Names Kubernetes would refuse: every name and key the configuration gives or derives
  (namespaces, Secret and ConfigMap names, Service names, ConfigMap keys, Kong client
  names) follows the apiserver's own rules at ``config check`` / start-up (exit 2 naming
  the field); the rules are pinned here against the real apiserver's answers. What
  only the cluster can refuse (a namespace that does not exist) fails that object alone.
- "A 5 MB ConfigMap" cannot exist: the apiserver refuses a ConfigMap (or Secret) over
  1 MiB of data (pinned below). The real cases are a managed ConfigMap replaced by one
  near that limit (repaired like any drift) and a 5 MB file planted in the directory
  target (replaced without being read: a file of the wrong size is never read).
- The journal's files (``state.json``, ``state.d/**``) at mode 0644 are tightened to
  0600 with a warning; files another user owns, when the daemon cannot read or repair
  them, stop the pass (exit 1) naming the path, the owner, the mode and the fix, and
  are left exactly as they were. A FIFO in the place of a published or journal file
  never blocks a pass.
- Kong Admin API delivery is tested against the Kong stand-in (tests/support/fake_kong_admin.py):
  no Kong runs here.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.errors import ConfigError
from ca_daemon.journal.format import shard_of
from ca_daemon.journal.open import file_journal
from ca_daemon.model.state import LINKERD_ISSUER
from ca_daemon.model.world import TrustWorld, desired_world
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.report.verify import verify_directory
from ca_daemon.rotation.engine import Engine
from ca_daemon.service.metrics import Metrics
from tests.support.cli import ca_daemon, daemon_env
from tests.support.clock import NOW
from tests.support.fake_kong_admin import FakeKong
from tests.support.kong_delivery import TOKEN as KONG_TOKEN
from tests.support.kong_delivery import cert_id as kong_cert_id
from tests.support.kong_delivery import kong_setup, kong_stand_in
from tests.support.kube_cluster import Cluster, make_cluster, published_cluster
from tests.support.published_files import documented_files
from tests.support.servers.kube import Kube
from tests.support.settings import two_clients

pytestmark = pytest.mark.integration

# --- garbage ---------------------------------------------------------------------------------

Garbage = tuple[bytes, bytes]  # (what goes where a certificate was, where a key was)


def _self_signed(key: Any, days_from: int, days_to: int, algorithm: Any) -> Garbage:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pasted in")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days_from))
        .not_valid_after(now + dt.timedelta(days=days_to))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, algorithm)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


GARBAGE: dict[str, Callable[[], Garbage]] = {
    "not-pem": lambda: (b"this is not a certificate\n", b"nor is this a key\n"),
    # Not even UTF-8: what a binary file (a DER key, a tarball) pasted in looks like.
    "not-utf8": lambda: (b"\x30\x82\xff\xfe\x00binary", b"\xff\xd8\xff\xe0\x00\x10JFIF"),
    "rsa": lambda: _self_signed(
        rsa.generate_private_key(public_exponent=65537, key_size=2048), -1, 30, hashes.SHA256()
    ),
    "ed25519": lambda: _self_signed(ed25519.Ed25519PrivateKey.generate(), -1, 30, None),
    "expired": lambda: _self_signed(
        ec.generate_private_key(ec.SECP256R1()), -30, -1, hashes.SHA256()
    ),
}


# --- Kubernetes: published objects edited into garbage ---------------------------------------


@pytest.fixture(scope="module")
def edge_cluster(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    return published_cluster(kube, tmp_path_factory.mktemp("edge-k8s"), "edge")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _patch(kube: Kube, path: str, body: dict[str, Any]) -> None:
    with kube.http() as http:
        response = http.patch(
            path, json=body, headers={"Content-Type": "application/merge-patch+json"}
        )
    response.raise_for_status()


def _configmap_edit(key: str, content: bytes) -> dict[str, Any]:
    """A ConfigMap holds text in ``data``; bytes that are not UTF-8 can only be put in
    ``binaryData`` (the apiserver refuses a key in both)."""
    try:
        return {"data": {key: content.decode()}}
    except UnicodeDecodeError:
        return {"data": {key: None}, "binaryData": {key: _b64(content)}}


def _drift_events(c: Cluster, namespace: str, name: str) -> int:
    events = c.get(f"/api/v1/namespaces/{namespace}/events")["items"]
    return sum(
        e["reason"] == "DriftRepaired" and e["involvedObject"]["name"] == name for e in events
    )


def _world(engine: Engine) -> tuple[TrustWorld, dict[str, int]]:
    loaded = engine.journal.load()
    world = desired_world(loaded.state, engine.settings)
    return world, dict(loaded.credential_versions)


def _credentials(world: TrustWorld) -> dict[str, bytes]:
    """What the journal holds that matters: each issued certificate and key."""
    assert world.linkerd_issuer is not None
    found = {"linkerd-issuer": world.linkerd_issuer.cert.tbs_certificate_bytes}
    found["linkerd-issuer key"] = world.linkerd_issuer.key_pem
    for name, entry in world.kong_clients.items():
        found[f"kong/{name}"] = entry.cert.tbs_certificate_bytes
        found[f"kong/{name} key"] = entry.key_pem
    found["roots"] = b"".join(r.tbs_certificate_bytes for r in world.roots)
    return found


EVERYWHERE = ("issuer", "trust-roots", "client")


@pytest.mark.parametrize(
    ("garbage", "where"),
    [
        *(pytest.param(g, EVERYWHERE, id=g) for g in sorted(GARBAGE) if g != "not-utf8"),
        pytest.param("not-utf8", ("trust-roots",), id="not-utf8-configmap"),
    ],
)
def test_a_published_object_edited_into_garbage_is_restored_and_reported(
    edge_cluster: Cluster, garbage: str, where: tuple[str, ...]
) -> None:
    _garbage_is_restored_and_reported(edge_cluster, garbage, where)


def test_secret_bytes_that_are_not_utf8_are_restored_and_reported(
    kube: Kube, tmp_path: Path
) -> None:
    # A cluster of its own: while this fails, the garbage stays and blocks every pass.
    c = make_cluster(kube, tmp_path, "edgeutf")
    first = c.run("run", "--once")
    assert first.returncode == 0, first.stdout + first.stderr
    _garbage_is_restored_and_reported(c, "not-utf8", EVERYWHERE)


def _garbage_is_restored_and_reported(c: Cluster, garbage: str, where: tuple[str, ...]) -> None:
    engine = c.engine()
    assert engine.reconcile().ok
    world, versions = _world(engine)
    cert, key = GARBAGE[garbage]()
    issuer = f"/api/v1/namespaces/{c.linkerd_ns}/secrets/linkerd-identity-issuer"
    roots = f"/api/v1/namespaces/{c.linkerd_ns}/configmaps/linkerd-identity-trust-roots"
    client = f"/api/v1/namespaces/{c.app_ns}/secrets/kong-upstream-payments"
    bundle_copy = f"/api/v1/namespaces/{c.bundle_ns}/configmaps/upstream-trust"
    other = f"/api/v1/namespaces/{c.kong_ns}/secrets/kong-upstream-orders"
    before = {path: c.get(path) for path in (issuer, roots, client, bundle_copy, other)}

    edits = {
        "issuer": (
            issuer,
            {"data": {"tls.crt": _b64(cert), "tls.key": _b64(key), "ca.crt": _b64(cert)}},
        ),
        "trust-roots": (roots, _configmap_edit("ca-bundle.crt", cert)),
        "client": (client, {"data": {"tls.crt": _b64(cert), "tls.key": _b64(key)}}),
    }
    for target in where:
        _patch(c.kube, *edits[target])
    # Another object that needs work in the same pass: it must not wait for the garbage.
    with c.kube.http() as http:
        http.delete(bundle_copy).raise_for_status()

    # verify names what Linkerd and Kong would refuse; no traceback.
    verify = c.run("verify", "--kubeconfig", str(c.kube.admin_kubeconfig))
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert "Traceback" not in verify.stderr, verify.stderr
    assert "ConfigMap" in verify.stdout + verify.stderr

    drift = {
        "issuer": (c.linkerd_ns, "secret", "linkerd-identity-issuer", "ca.crt, tls.crt, tls.key"),
        "trust-roots": (c.linkerd_ns, "configmap", "linkerd-identity-trust-roots", "ca-bundle.crt"),
        "client": (c.app_ns, "secret", "kong-upstream-payments", "tls.crt, tls.key"),
    }
    events_before = {t: _drift_events(c, *drift[t][::2]) for t in where}
    metrics = Metrics()
    result = engine.reconcile()
    metrics.observe(result, c.settings, dt.datetime.now(dt.UTC))
    assert result.ok, result.errors
    (report,) = result.reports
    expected = {f"configmap/{c.bundle_ns}/upstream-trust (deleted)"}
    for target in where:
        ns, kind, name, keys = drift[target]
        ref = f"{kind}/{ns}/{name}"
        expected.add(f"{ref} (keys changed: {keys})")
        assert metrics.registry.get_sample_value("ca_daemon_drift", {"target": ref}) == 1
        assert _drift_events(c, ns, name) > events_before[target], name
    assert set(report.drifted) == expected
    for path in (issuer, roots, client):
        after = c.get(path)
        assert after["data"] == before[path]["data"], path
        assert not after.get("binaryData"), path
    assert c.get(bundle_copy)["data"] == before[bundle_copy]["data"]  # recreated, same pass
    unrelated = c.get(other)["metadata"]["resourceVersion"]
    assert unrelated == before[other]["metadata"]["resourceVersion"]  # not even rewritten

    # The journal is the source of truth and was not touched by what was found.
    after_world, after_versions = _world(engine)
    assert after_versions == versions
    assert _credentials(after_world) == _credentials(world)
    check = c.run("verify", "--kubeconfig", str(c.kube.admin_kubeconfig))
    assert check.returncode == 0, check.stdout + check.stderr


# --- names Kubernetes would refuse -----------------------------------------------------------

SUBDOMAINS = ["pay", "a.b.c", "a" * 253, "a" * 254, "a..b", "a.-b", "-a", "a-", "Pay", "a_b", "1a"]
LABELS = ["pay", "1a", "a" * 63, "a" * 64, "a.b", "-a", "a-", "Pay"]
SERVICES = ["api", "a" * 63, "a" * 64, "1api", "a.b", "Api", "api-"]
KEYS = ["ca-bundle.crt", "CA_bundle.PEM", "k" * 253, "k" * 254, ".", "..", "..a", "a/b", "a b"]


def _config_accepts(doc: dict[str, Any], tmp_path: Path) -> bool:
    path = tmp_path / "names.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_settings(path)
    except ConfigError:
        return False
    return True


def _apiserver_accepts(kube: Kube, path: str, body: dict[str, Any]) -> bool:
    with kube.http() as http:
        response = http.post(path, params={"dryRun": "All"}, json=body)
    assert response.status_code in (201, 422), response.text
    return response.status_code == 201


def test_config_check_refuses_exactly_the_names_the_apiserver_refuses(
    kube: Kube, tmp_path: Path
) -> None:
    ns = "edge-names"
    kube.create_namespace(ns)

    def client(**fields: Any) -> dict[str, Any]:
        return {"kong": {"clients": [{"name": "pay", "common_name": "kong.pay", **fields}]}}

    def bundle(**fields: Any) -> dict[str, Any]:
        return {"bundles": [{"namespace": ns, "configmap": "trust", **fields}]}

    def meta(name: str) -> dict[str, Any]:
        return {"name": name, "namespace": ns}

    cases: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = []
    for name in SUBDOMAINS:
        cases.append(
            (
                f"secret {name!r}",
                client(secret=name),
                f"/api/v1/namespaces/{ns}/secrets",
                {
                    "metadata": meta(name),
                    "type": "kubernetes.io/tls",
                    "data": {"tls.crt": "", "tls.key": ""},
                },
            )
        )
        cases.append(
            (
                f"configmap {name!r}",
                bundle(configmap=name),
                f"/api/v1/namespaces/{ns}/configmaps",
                {"metadata": meta(name)},
            )
        )
    for name in LABELS:
        cases.append(
            (
                f"namespace {name!r}",
                {"bundles": [{"namespace": name, "configmap": "trust"}]},
                "/api/v1/namespaces",
                {"metadata": {"name": name}},
            )
        )
    for name in SERVICES:
        cases.append(
            (
                f"service {name!r}",
                client(service=f"{ns}/{name}"),
                f"/api/v1/namespaces/{ns}/services",
                {"metadata": meta(name), "spec": {"ports": [{"port": 443}]}},
            )
        )
    for key in KEYS:
        cases.append(
            (
                f"configmap key {key!r}",
                bundle(key=key),
                f"/api/v1/namespaces/{ns}/configmaps",
                {"metadata": meta("trust"), "data": {key: "x"}},
            )
        )
    disagree = [
        f"{what}: config {'accepts' if ours else 'refuses'}, the apiserver "
        f"{'accepts' if theirs else 'refuses'}"
        for what, doc, path, body in cases
        if (ours := _config_accepts(doc, tmp_path))
        != (theirs := _apiserver_accepts(kube, path, body))
    ]
    assert not disagree, "\n".join(disagree)
    # Both sides refused some and accepted some: the comparison means something.
    assert {_config_accepts(doc, tmp_path) for _, doc, _, _ in cases} == {True, False}


@pytest.mark.parametrize("name", ["p" * 63, "a1", "9lives"])
def test_every_kong_client_name_config_accepts_makes_names_the_apiserver_accepts(
    kube: Kube, tmp_path: Path, name: str
) -> None:
    """A client's name becomes its default Secret name (kong-upstream-<name>), a directory
    and a journal record: what config check lets through must be a name Kubernetes takes."""
    ns = "edge-client-names"
    kube.create_namespace(ns)
    doc = {"kong": {"clients": [{"name": name, "common_name": "kong.client"}]}}
    assert _config_accepts(doc, tmp_path)
    settings = load_settings(tmp_path / "names.yaml")
    secret = settings.kong.clients[0].secret_name
    body = {
        "metadata": {"name": secret, "namespace": ns},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": "", "tls.key": ""},
    }
    assert _apiserver_accepts(kube, f"/api/v1/namespaces/{ns}/secrets", body)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (
            {"kong": {"clients": [{"name": "Pay", "common_name": "kong.pay"}]}},
            "kong.clients[0].name",
        ),
        (
            {"kong": {"clients": [{"name": "p" * 64, "common_name": "kong.pay"}]}},
            "kong.clients[0].name",
        ),
        (
            {"kong": {"clients": [{"name": "pay", "common_name": "x", "secret": "a..b"}]}},
            "kong.clients[0].secret",
        ),
        (
            {"kong": {"clients": [{"name": "pay", "common_name": "x", "service": "pay/1api"}]}},
            "kong.clients[0].service",
        ),
        ({"linkerd": {"trust_roots_configmap": "roots_"}}, "linkerd.trust_roots_configmap"),
        ({"bundles": [{"namespace": "b", "configmap": "c", "key": "a/b"}]}, "bundles[0].key"),
    ],
    ids=[
        "upper-case-client",
        "client-too-long",
        "secret-double-dot",
        "service-digit",
        "configmap-underscore",
        "key-slash",
    ],
)
def test_run_exits_2_naming_the_field_of_a_name_kubernetes_would_refuse(
    tmp_path: Path, doc: dict[str, Any], field: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"anchor": {"local": {"dir": str(tmp_path / "data")}}, **doc}))
    for command in (("config", "check", str(config)), ("run", "--once", "--config", str(config))):
        result = ca_daemon(*command, cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"  {field}: " in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # nothing was started


def test_a_bundle_namespace_that_does_not_exist_fails_that_object_only(
    kube: Kube, tmp_path: Path
) -> None:
    """A namespace the configuration names but the cluster lacks is refused only by the
    apiserver, at run time: that one ConfigMap fails, clearly; the others are published."""
    c = make_cluster(kube, tmp_path, "edgens")
    doc = yaml.safe_load(c.config.read_text())
    doc["bundles"].append({"namespace": "edge-no-such-namespace", "configmap": "upstream-trust"})
    c.config.write_text(yaml.safe_dump(doc))
    result = c.run("run", "--once")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "configmap/edge-no-such-namespace/upstream-trust" in result.stderr
    assert "Traceback" not in result.stderr
    assert c.configmap(c.linkerd_ns, "linkerd-identity-trust-roots") is not None
    assert c.secret(c.linkerd_ns, "linkerd-identity-issuer") is not None
    assert c.secret(c.app_ns, "kong-upstream-payments") is not None
    assert c.configmap(c.bundle_ns, "upstream-trust") is not None


# --- 5 MB: what can really be that big ---------------------------------------------------------

MIB = 1024 * 1024


def test_a_5mb_configmap_cannot_exist_and_one_near_the_limit_is_repaired(
    edge_cluster: Cluster,
) -> None:
    c = edge_cluster
    engine = c.engine()
    assert engine.reconcile().ok
    roots = f"/api/v1/namespaces/{c.linkerd_ns}/configmaps/linkerd-identity-trust-roots"
    before = c.get(roots)
    with c.kube.http() as http:
        refused = http.patch(
            roots,
            json={"data": {"ca-bundle.crt": "A" * (5 * MIB)}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
    # The apiserver refuses any ConfigMap over 1 MiB of data: "a 5 MB ConfigMap" is
    # never something the daemon reads.
    assert refused.status_code in (413, 422), refused.text
    assert c.get(roots)["data"] == before["data"]

    # Replaced with one just under the limit: a bundle of garbage and an extra key.
    near = {"ca-bundle.crt": "B" * (MIB // 2), "padding": "C" * (MIB // 2 - 4096)}
    _patch(c.kube, roots, {"data": near})
    result = engine.reconcile()
    assert result.ok, result.errors
    (report,) = result.reports
    ref = f"configmap/{c.linkerd_ns}/linkerd-identity-trust-roots"
    assert f"{ref} (keys changed: ca-bundle.crt, padding)" in report.drifted, report.drifted
    assert c.get(roots)["data"] == before["data"]


@pytest.fixture
def local(tmp_path: Path) -> Settings:
    return two_clients(tmp_path)


def _local_engine(settings: Settings) -> Engine:
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    return Engine(
        settings,
        LocalAnchor(settings.anchor.local.dir, passphrase),
        file_journal(settings, passphrase),
        [DirectoryPublisher(settings.publish_directory)],
    )


def _published(out: Path) -> dict[str, bytes]:
    return {rel: (out / rel).read_bytes() for rel in documented_files(out)}


def _published_an_hour_ago(out: Path) -> None:
    """Move the published version's clock back instead of waiting: file times have a
    coarse granularity, and an edit in the same tick as the publish looks like ours."""
    hour_ago = int((dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).timestamp() * 1e9)
    version = out / os.readlink(out / "..data")
    for dirpath, dirs, names in os.walk(version):
        for name in [*dirs, *names]:
            os.utime(Path(dirpath) / name, ns=(hour_ago, hour_ago), follow_symlinks=False)
    for path in (version, out / "..data"):
        os.utime(path, ns=(hour_ago, hour_ago), follow_symlinks=False)


# --- Kong Admin API (stand-in): entities edited into garbage -----------------------------------


@pytest.fixture
def kong_admin() -> Iterator[FakeKong]:
    """The Kong stand-in (tests/support/fake_kong_admin.py): no Kong runs here."""
    with kong_stand_in() as fake:
        yield fake


@pytest.mark.parametrize("garbage", ["rsa", "ed25519", "expired"])
def test_a_kong_certificate_edited_into_garbage_is_restored_and_reported(
    tmp_path: Path, kong_admin: FakeKong, garbage: str
) -> None:
    """Kong itself refuses a Certificate that is not PEM or whose key does not match, but
    takes another key type or an expired certificate: those are what someone can leave
    in an entity. With the Kong stand-in."""
    setup = kong_setup(tmp_path, kong_admin, token=KONG_TOKEN)
    assert setup.engine.reconcile(now=NOW).ok
    store = kong_admin.store
    payments, orders = kong_cert_id("payments"), kong_cert_id("orders")
    wanted = {k: dict(v) for k, v in store.certificates.items()}
    cert, key = GARBAGE[garbage]()
    store.certificates[payments].update(cert=cert.decode(), key=key.decode())
    # Other work in the same pass: a renewal that must not wait for the garbage.
    setup.engine.request_rotation("kong/orders", "test", now=NOW.replace(minute=30))

    result = setup.engine.reconcile(now=NOW.replace(hour=13))
    assert result.ok, result.errors
    (report,) = result.reports
    assert report.drifted == [f"certificate/{payments}"]
    assert store.certificates[payments]["cert"] == wanted[payments]["cert"]
    assert store.certificates[payments]["key"] == wanted[payments]["key"]
    assert store.certificates[orders]["cert"] != wanted[orders]["cert"]  # renewed meanwhile


# --- the directory publisher: its files edited into garbage ----------------------------------


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
def test_a_published_file_edited_into_garbage_is_restored_and_reported(
    local: Settings, garbage: str
) -> None:
    engine = _local_engine(local)
    assert engine.reconcile().ok
    out = local.publish_directory
    world, versions = _world(engine)
    before = _published(out)
    _published_an_hour_ago(out)
    cert, key = GARBAGE[garbage]()
    (out / "linkerd/tls.crt").write_bytes(cert)  # in place, as an editor or `cat >` does
    (out / "linkerd/tls.key").write_bytes(key)
    # The bundle, replaced by a new file (as `cp new old` over a symlink does not: this
    # is `mv`), and a client's certificate in place.
    planted = out / "..data/trust-bundle.pem"
    (out / "..planted").write_bytes(cert)
    os.replace(out / "..planted", planted)
    (out / "kong/clients/payments/tls.crt").write_bytes(cert)
    (root_file,) = (out / "kong/ca").iterdir()
    root_file.unlink()
    # verify names what Linkerd and Kong would refuse, and does not trip over it.
    found = verify_directory(out, dt.datetime.now(dt.UTC))
    assert not found.ok
    assert any("linkerd" in p for p in found.problems), found.problems
    # Other work in the same pass: a renewal that must not wait for the garbage.
    engine.request_rotation("kong/orders", "test")

    metrics = Metrics()
    result = engine.reconcile()
    metrics.observe(result, local, dt.datetime.now(dt.UTC))
    assert result.ok, result.errors
    (report,) = result.reports
    drifted = {
        "linkerd/tls.crt (changed)",
        "linkerd/tls.key (changed)",
        "trust-bundle.pem (changed)",
        "kong/clients/payments/tls.crt (changed)",
        f"kong/ca/{root_file.name} (deleted)",
    }
    assert set(report.drifted) == drifted  # the renewal of orders is not drift
    for entry in drifted:
        target = entry.split(" ")[0]
        assert metrics.registry.get_sample_value("ca_daemon_drift", {"target": target}) == 1
    after = _published(out)
    renewed = {"kong/clients/orders/tls.crt", "kong/clients/orders/tls.key"}
    assert {rel for rel in after if after[rel] != before.get(rel)} == renewed
    assert verify_directory(out, dt.datetime.now(dt.UTC)).ok

    after_world, after_versions = _world(engine)
    assert {k: v for k, v in after_versions.items() if k != "kong/orders"} == {
        k: v for k, v in versions.items() if k != "kong/orders"
    }
    unchanged = {k: v for k, v in _credentials(world).items() if not k.startswith("kong/orders")}
    assert unchanged.items() <= _credentials(after_world).items()

    quiet = engine.reconcile()
    assert quiet.ok and quiet.reports[0].drifted == [] and quiet.reports[0].changed == []


def test_a_5mb_file_in_the_directory_is_replaced_without_being_read(local: Settings) -> None:
    engine = _local_engine(local)
    assert engine.reconcile().ok
    out = local.publish_directory
    loaded = engine.journal.load()
    world = desired_world(loaded.state, local, loaded.version, dict(loaded.credential_versions))
    before = _published(out)
    _published_an_hour_ago(out)
    big = out / "kong/clients/payments/tls.crt"
    with big.open("wb") as handle:
        for _ in range(5):
            handle.write(b"A" * MIB)
    tracemalloc.start()
    try:
        report = DirectoryPublisher(out).publish(world)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.errors == {}
    assert "kong/clients/payments/tls.crt (changed)" in report.drifted
    assert _published(out) == before
    # The 5 MB are never read: a file of the wrong size is replaced unseen.
    assert peak < MIB, peak


def test_a_fifo_or_a_directory_in_place_of_a_published_file_is_replaced(local: Settings) -> None:
    engine = _local_engine(local)
    assert engine.reconcile().ok
    out = local.publish_directory
    before = _published(out)
    _published_an_hour_ago(out)
    fifo = out / "linkerd/tls.crt"
    fifo.unlink()
    os.mkfifo(fifo)
    directory = out / "kong/clients/payments/tls.key"
    directory.unlink()
    directory.mkdir()
    (directory / "inside").write_bytes(b"x")
    # A subprocess with a timeout: a pass blocked in open() on the FIFO fails the test
    # instead of hanging it.
    config = local.anchor.local.dir.parent / "config.yaml"
    result = ca_daemon("run", "--once", "--config", str(config), cwd=config.parent)
    assert result.returncode == 0, result.stderr
    assert "linkerd/tls.crt (changed)" in result.stderr
    # A directory where a file was: the file is gone, and something was added.
    assert "kong/clients/payments/tls.key (deleted)" in result.stderr
    assert "kong/clients/payments/tls.key/inside (added)" in result.stderr
    assert _published(out) == before


def test_verify_names_a_fifo_in_place_of_a_published_file(local: Settings) -> None:
    engine = _local_engine(local)
    assert engine.reconcile().ok
    out = local.publish_directory
    fifo = out / "linkerd/tls.crt"
    fifo.unlink()
    os.mkfifo(fifo)
    config = local.anchor.local.dir.parent / "config.yaml"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ca_daemon", "verify", "--config", str(config)],
            cwd=config.parent,
            env=daemon_env(),
            capture_output=True,
            text=True,
            timeout=30,  # not a time assertion: a verify blocked in open() never returns
        )
    except subprocess.TimeoutExpired:
        pytest.fail("verify blocked on the FIFO")
    assert result.returncode == 1
    assert f"{fifo}" in result.stdout + result.stderr


@pytest.mark.parametrize("record", ["state.json", f"state.d/{shard_of(LINKERD_ISSUER)}.json"])
def test_a_fifo_in_place_of_a_journal_file_stops_the_pass_instead_of_hanging_it(
    local: Settings, record: str
) -> None:
    engine = _local_engine(local)
    assert engine.reconcile().ok
    data = local.anchor.local.dir
    out = local.publish_directory
    published = _published(out)
    path = data / record
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    os.mkfifo(path)
    config = data.parent / "config.yaml"
    result = ca_daemon("run", "--once", "--config", str(config), cwd=config.parent)
    assert result.returncode == 1, result.stderr
    assert f"{path} is not a regular file (a FIFO)" in result.stderr
    assert "Traceback" not in result.stderr
    assert _published(out) == published
    # Put back, the journal is whole again: nothing was written meanwhile.
    path.unlink()
    aside.rename(path)
    again = ca_daemon("run", "--once", "--config", str(config), cwd=config.parent)
    assert again.returncode == 0, again.stderr


# --- the journal's files: mode 0644, another owner --------------------------------------------

DAEMON_UID, OTHER_UID = 10001, 10002


def _run_once_as(uid: int, config: Path, logs: Path) -> tuple[int, str]:
    """``ca-daemon run --once`` as ``uid``, in a child forked from this process.

    A forked child, not a new interpreter: this test's interpreter lives under a home
    directory other users cannot enter. Everything the pass imports is imported before
    the privileges are dropped.
    """
    import encodings.utf_8_sig  # noqa: F401  (the YAML loader's, imported on first use)

    import ca_daemon.cli as cli
    import ca_daemon.daemon  # noqa: F401  (run's, with APScheduler's executors, on first use)

    with logs.open("wb") as out:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 70
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                # pytest's capture replaced these objects: write where the fds now go.
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.environ.pop("KUBECONFIG", None)
                code = cli.main(["run", "--once", "--config", str(config)])
            except BaseException as exc:  # report anything, then leave
                os.write(2, f"child failed: {exc!r}\n".encode())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), logs.read_text()


@pytest.fixture
def unprivileged(tmp_path: Path) -> Iterator[Path]:
    """A data directory owned by DAEMON_UID, its first pass run as that user; yields the
    configuration file."""
    if os.geteuid() != 0:
        pytest.skip("running the daemon as another user needs root")
    base = Path(tempfile.mkdtemp(prefix="ca-daemon-edge-"))
    try:
        base.chmod(0o755)
        config = base / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "anchor": {"local": {"dir": str(base / "data")}},
                    "publish": {"kubernetes": {"enabled": False}},
                    "kong": {"clients": [{"name": "payments", "common_name": "kong.payments"}]},
                }
            )
        )
        (base / "data").mkdir(mode=0o700)
        os.chown(base / "data", DAEMON_UID, DAEMON_UID)
        code, output = _run_once_as(DAEMON_UID, config, tmp_path / "first.log")
        assert code == 0, output
        yield config
    finally:
        shutil.rmtree(base)


def _owned_by_another_user(path: Path, mode: int) -> None:
    os.chown(path, OTHER_UID, OTHER_UID)
    path.chmod(mode)


@pytest.mark.parametrize("mode", [0o600, 0o644])
@pytest.mark.parametrize("record", ["state.json", f"state.d/{shard_of(LINKERD_ISSUER)}.json"])
def test_a_journal_file_another_user_owns_stops_the_pass_naming_owner_and_fix(
    unprivileged: Path, tmp_path: Path, record: str, mode: int
) -> None:
    data = unprivileged.parent / "data"
    path = data / record
    _owned_by_another_user(path, mode)
    content = path.read_bytes()
    out = data / "out"
    published = _published(out)

    code, output = _run_once_as(DAEMON_UID, unprivileged, tmp_path / "run.log")
    assert code == 1, output
    assert "Traceback" not in output and "child failed" not in output, output
    assert str(path) in output, output
    assert f"owned by uid {OTHER_UID}" in output and f"runs as uid {DAEMON_UID}" in output
    assert f"chown {DAEMON_UID} {path}" in output, output
    # Nothing lost, nothing changed: not the file, not its owner, not what is published.
    assert path.read_bytes() == content
    assert (path.stat().st_uid, path.stat().st_mode & 0o777) == (OTHER_UID, mode)
    assert _published(out) == published

    # The fix the message gives works.
    os.chown(path, DAEMON_UID, DAEMON_UID)
    path.chmod(0o600)
    code, output = _run_once_as(DAEMON_UID, unprivileged, tmp_path / "fixed.log")
    assert code == 0, output


def test_a_journal_file_of_its_own_at_0644_is_tightened_with_a_warning(
    unprivileged: Path, tmp_path: Path
) -> None:
    data = unprivileged.parent / "data"
    path = data / "state.json"
    path.chmod(0o644)
    content = path.read_bytes()
    code, output = _run_once_as(DAEMON_UID, unprivileged, tmp_path / "run.log")
    assert code == 0, output
    assert f"repaired the mode of a secret: {path}: was mode 0644" in output, output
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() == content
