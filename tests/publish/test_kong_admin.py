"""Kong Admin API delivery (kong.delivery: admin-api) over the real engine and local anchor.

No Kong binary can run in this test environment, so Kong is the stand-in from
tests/support/fake_kong_admin.py: a real HTTP server on a loopback port that enforces Kong's
entity rules (key matches cert, one unexpired CA per CA Certificate, client_certificate
only on https/tls Services, no deleting a referenced CA certificate, DB-less 405s, token).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_daemon.model.state import State
from ca_daemon.model.world import desired_world
from ca_daemon.pki.bundle import render_pem, stable_id
from ca_daemon.publish.base import PublishReport
from ca_daemon.publish.kong_admin import KongAdminPublisher
from ca_daemon.rotation.results import PassResult
from tests.support.cli import ca_daemon
from tests.support.clock import NOW
from tests.support.fake_kong_admin import FakeKong, KongError, serve
from tests.support.kong_delivery import (
    CLIENTS,
    TOKEN,
    cert_id,
    config_file,
    kong_setup,
    kong_stand_in,
    only_report,
    state_of,
)
from tests.support.pki import issue, make_ca, self_signed_root

pytestmark = pytest.mark.integration


@pytest.fixture
def kong() -> Iterator[FakeKong]:
    with kong_stand_in() as fake:
        yield fake


def _public(key_or_cert: Any) -> bytes:
    return bytes(
        key_or_cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _assert_no_key_material(result: PassResult | PublishReport, state: State) -> None:
    if isinstance(result, PassResult):
        texts = [*result.errors, *(repr(r) for r in result.reports)]
    else:
        texts = [repr(result)]
    secrets = [e.key_pem.decode() for e in state.kong_clients.values()]
    # The base64 body of each key, a line at a time, must appear nowhere.
    lines = [ln for s in secrets for ln in s.splitlines() if ln and not ln.startswith("-----")]
    for text in texts:
        assert "PRIVATE KEY" not in text
        assert not any(line in text for line in lines)


def test_first_pass_publishes_everything_and_second_pass_writes_nothing(
    tmp_path: Path, kong: FakeKong
) -> None:
    setup = kong_setup(tmp_path, kong)
    first = setup.engine.reconcile(now=NOW)
    assert first.ok, first.errors
    state = state_of(first)
    store = kong.store

    assert set(store.certificates) == {cert_id(n) for n in CLIENTS}
    for name in CLIENTS:
        entity = store.certificates[cert_id(name)]
        issued = state.kong_clients[name]
        chain = x509.load_pem_x509_certificates(entity["cert"].encode())
        assert state.ca.active_intermediate is not None
        assert chain == [issued.cert, state.ca.active_intermediate.cert]  # leaf, then intermediate
        key = serialization.load_pem_private_key(entity["key"].encode(), None)
        assert _public(key) == _public(issued.cert)
        assert "managed-by-ca-daemon" in entity["tags"]

    roots = [r.cert for r in state.ca.roots]
    assert set(store.ca_certificates) == {stable_id(r) for r in roots}
    for root in roots:
        assert store.ca_certificates[stable_id(root)]["cert"] == render_pem([root])

    for name, service in CLIENTS.items():
        live = store.service(service)
        assert live is not None
        assert live["client_certificate"] == {"id": cert_id(name)}

    report = only_report(first)
    assert set(report.changed) == {
        *(f"certificate/{cert_id(n)}" for n in CLIENTS),
        *(f"ca_certificate/{stable_id(r)}" for r in roots),
        *(f"service/{s}" for s in CLIENTS.values()),
    }
    assert report.drifted == []

    writes = list(store.writes)
    second = setup.engine.reconcile(now=NOW.replace(hour=13))
    assert second.ok, second.errors
    assert store.writes == writes  # nothing differed, so nothing was written
    assert only_report(second).changed == []


def test_forced_rotation_updates_the_same_certificate_in_place(
    tmp_path: Path, kong: FakeKong
) -> None:
    setup = kong_setup(tmp_path, kong)
    assert setup.engine.reconcile(now=NOW).ok
    store = kong.store
    before = {k: dict(v) for k, v in store.certificates.items()}
    payments = cert_id("payments")
    writes = len(store.writes)

    setup.engine.request_rotation("kong/payments", "test", now=NOW.replace(hour=13))
    result = setup.engine.reconcile(now=NOW.replace(hour=13, minute=1))
    assert result.ok, result.errors
    state = state_of(result)

    assert set(store.certificates) == set(before)  # no new entity: the same id, updated
    updated = store.certificates[payments]
    assert updated["cert"] != before[payments]["cert"]
    assert updated["key"] != before[payments]["key"]
    leaf = x509.load_pem_x509_certificates(updated["cert"].encode())[0]
    assert leaf == state.kong_clients["payments"].cert
    key = serialization.load_pem_private_key(updated["key"].encode(), None)
    assert _public(key) == _public(leaf)
    assert store.certificates[cert_id("orders")] == before[cert_id("orders")]
    # The Service already points at that id: nothing but the one PUT was needed.
    assert store.writes[writes:] == [("PUT", f"/certificates/{payments}")]
    report = only_report(result)
    assert report.changed == [f"certificate/{payments}"]
    assert report.drifted == []  # a rotation is the daemon's own change, not drift
    _assert_no_key_material(result, state)


def test_http_service_is_reported_and_the_rest_still_published(
    tmp_path: Path, kong: FakeKong
) -> None:
    orders = kong.store.service("orders-api")
    assert orders is not None
    orders["protocol"] = "http"
    setup = kong_setup(tmp_path, kong)

    result = setup.engine.reconcile(now=NOW)
    error = only_report(result).errors
    assert set(error) == {"service/orders-api"}
    assert "protocol http" in error["service/orders-api"]
    assert "must use protocol https" in error["service/orders-api"]
    assert any("service/orders-api" in e for e in result.errors)
    assert orders["client_certificate"] is None  # left exactly as it was
    payments = kong.store.service("payments-api")
    assert payments is not None
    assert payments["client_certificate"] == {"id": cert_id("payments")}
    assert set(kong.store.certificates) == {cert_id(n) for n in CLIENTS}
    _assert_no_key_material(result, state_of(result))


def test_db_less_kong_gets_one_clear_error_and_no_write(tmp_path: Path, kong: FakeKong) -> None:
    kong.store.db_less = True
    setup = kong_setup(tmp_path, kong)

    result = setup.engine.reconcile(now=NOW)
    report = only_report(result)
    assert list(report.errors) == ["kong"]
    message = report.errors["kong"]
    assert kong.url in message and "DB-less" in message and "database=off" in message
    assert "kong.delivery: kubernetes" in message
    assert [e for e in result.errors if "kong" in e.lower()] == [
        f"publish to {setup.publisher.description}: kong: {message}"
    ]
    assert kong.store.writes == []
    assert report.changed == []


def test_wrong_token_is_a_clear_error_and_nothing_is_written(
    tmp_path: Path, kong: FakeKong
) -> None:
    setup = kong_setup(tmp_path, kong, token="not-the-token")

    result = setup.engine.reconcile(now=NOW)
    report = only_report(result)
    assert list(report.errors) == ["kong"]
    message = report.errors["kong"]
    assert kong.url in message and "HTTP 401" in message and "token_file" in message
    assert "not-the-token" not in message
    assert kong.store.writes == []
    assert kong.store.certificates == {} and kong.store.ca_certificates == {}


def test_unreachable_kong_names_the_url(tmp_path: Path, kong: FakeKong) -> None:
    with serve() as gone:
        url = gone.url  # a port that was just served and is now closed
    setup = kong_setup(tmp_path, kong, url=url)

    report = only_report(setup.engine.reconcile(now=NOW))
    assert list(report.errors) == ["kong"]
    assert f"cannot reach the Kong Admin API at {url}" in report.errors["kong"]


def test_retired_root_is_deleted_only_once_no_service_references_it(
    tmp_path: Path, kong: FakeKong
) -> None:
    store = kong.store
    store.page_size = 1  # every listing takes several pages
    # Sorted last, so the reference is only seen by reading past the first page.
    user = store.add_service("legacy-api", id="ffffffff-ffff-4fff-bfff-ffffffffffff")
    _, foreign = self_signed_root("someone else's CA")
    foreign_id = "00000000-0000-4000-8000-000000000001"
    store.ca_certificates[foreign_id] = {"id": foreign_id, "cert": render_pem([foreign])}
    setup = kong_setup(tmp_path, kong)
    first = setup.engine.reconcile(now=NOW)
    assert first.ok, first.errors
    world = desired_world(state_of(first), setup.settings)
    _, old = self_signed_root("old root")
    old_id = stable_id(old)
    with_old = replace(world, roots=(old, *world.roots))
    assert setup.publisher.publish(with_old).errors == {}
    assert old_id in store.ca_certificates
    user["ca_certificates"] = [old_id]

    kept = setup.publisher.publish(world)  # the old root has left the bundle
    assert set(kept.errors) == {f"ca_certificate/{old_id}"}
    assert "legacy-api" in kept.errors[f"ca_certificate/{old_id}"]
    assert old_id in store.ca_certificates
    assert ("DELETE", f"/ca_certificates/{old_id}") not in store.writes

    user["ca_certificates"] = None
    gone = setup.publisher.publish(world)
    assert gone.errors == {}
    assert f"ca_certificate/{old_id} (deleted)" in gone.changed
    assert old_id not in store.ca_certificates
    assert set(store.ca_certificates) == {*(stable_id(r) for r in world.roots), foreign_id}
    assert not any(foreign_id in path for _, path in store.writes)  # not ours: never touched


def test_dropped_client_certificate_is_deleted_once_its_service_moves_off(
    tmp_path: Path, kong: FakeKong
) -> None:
    setup = kong_setup(tmp_path, kong)
    first = setup.engine.reconcile(now=NOW)
    assert first.ok, first.errors
    world = desired_world(state_of(first), setup.settings)
    only_payments = replace(world, kong_clients={"payments": world.kong_clients["payments"]})
    orders = cert_id("orders")

    kept = setup.publisher.publish(only_payments)
    assert "orders-api" in kept.errors[f"certificate/{orders}"]
    assert orders in kong.store.certificates

    service = kong.store.service("orders-api")
    assert service is not None
    service["client_certificate"] = None
    gone = setup.publisher.publish(only_payments)
    assert gone.errors == {}
    assert set(kong.store.certificates) == {cert_id("payments")}


def test_drift_is_reported_and_repaired(tmp_path: Path, kong: FakeKong) -> None:
    setup = kong_setup(tmp_path, kong)
    first = setup.engine.reconcile(now=NOW)
    assert first.ok, first.errors
    state = state_of(first)
    store = kong.store
    payments, orders = cert_id("payments"), cert_id("orders")
    wanted = {k: dict(v) for k, v in store.certificates.items()}
    root_id = stable_id(state.ca.roots[0].cert)
    # Someone pastes the orders certificate into the payments entity, deletes the root's
    # CA certificate and points a Service elsewhere.
    store.certificates[payments].update(cert=wanted[orders]["cert"], key=wanted[orders]["key"])
    del store.ca_certificates[root_id]
    payments_api = store.service("payments-api")
    assert payments_api is not None
    payments_api["client_certificate"] = {"id": orders}

    result = setup.engine.reconcile(now=NOW.replace(hour=13))
    assert result.ok, result.errors
    report = only_report(result)
    assert set(report.drifted) == {
        f"certificate/{payments}",
        f"ca_certificate/{root_id}",
        "service/payments-api",
    }
    assert store.certificates[payments]["cert"] == wanted[payments]["cert"]
    assert store.certificates[payments]["key"] == wanted[payments]["key"]
    assert store.ca_certificates[root_id]["cert"] == render_pem([state.ca.roots[0].cert])
    assert payments_api["client_certificate"] == {"id": payments}
    _assert_no_key_material(result, state)


def test_edited_ca_certificate_is_drift_even_after_a_restart(
    tmp_path: Path, kong: FakeKong
) -> None:
    assert kong_setup(tmp_path, kong).engine.reconcile(now=NOW).ok
    (root_id,) = kong.store.ca_certificates
    kong.store.ca_certificates[root_id]["tags"] = ["edited"]

    restarted = kong_setup(tmp_path, kong)  # a new process remembers nothing it wrote
    report = only_report(restarted.engine.reconcile(now=NOW.replace(hour=13)))
    assert report.drifted == [f"ca_certificate/{root_id}"]
    assert "managed-by-ca-daemon" in kong.store.ca_certificates[root_id]["tags"]


def test_refused_certificate_is_left_as_is_and_its_key_never_reported(
    tmp_path: Path, kong: FakeKong
) -> None:
    payments = cert_id("payments")

    def echo_body(method: str, path: str, body: dict[str, Any]) -> KongError | None:
        # A proxy in front of Kong that echoes the part of the request it objects to.
        if method == "PUT" and path == f"/certificates/{payments}":
            return KongError(400, f"refused by policy, key is {body['key']}")
        return None

    kong.store.fault = echo_body
    setup = kong_setup(tmp_path, kong)
    result = setup.engine.reconcile(now=NOW)
    state = state_of(result)
    report = only_report(result)

    assert set(report.errors) == {f"certificate/{payments}"}
    assert "refused by policy" in report.errors[f"certificate/{payments}"]
    assert payments not in kong.store.certificates
    payments_api = kong.store.service("payments-api")
    assert payments_api is not None and payments_api["client_certificate"] is None
    assert cert_id("orders") in kong.store.certificates  # the others went ahead
    _assert_no_key_material(result, state)


def test_https_admin_api_is_verified_against_the_configured_ca(tmp_path: Path) -> None:
    ca = make_ca("kong admin ca")
    served = issue(ca, "kong-admin", server=True, ips=("127.0.0.1",)).write(tmp_path, "admin")
    ca_file = tmp_path / "admin-ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(make_ca("someone else").cert_pem)
    with serve(tls=served) as kong:
        kong.store.token = TOKEN
        kong.store.clock = lambda: NOW
        for service in CLIENTS.values():
            kong.store.add_service(service)

        engine = kong_setup(tmp_path, kong, ca_cert=other_ca).engine
        refused = only_report(engine.reconcile(now=NOW))
        assert list(refused.errors) == ["kong"]
        assert f"cannot reach the Kong Admin API at {kong.url}" in refused.errors["kong"]
        assert "CERTIFICATE_VERIFY_FAILED" in refused.errors["kong"]
        assert kong.store.writes == []

        trusted = kong_setup(tmp_path, kong, ca_cert=ca_file).engine.reconcile(now=NOW)
        assert trusted.ok, trusted.errors
        assert set(kong.store.certificates) == {cert_id(n) for n in CLIENTS}


def test_run_once_with_admin_api_delivery_publishes_to_kong(tmp_path: Path) -> None:
    """The command line wires the Admin API publisher from configuration alone."""
    with serve() as fake:
        fake.store.token = TOKEN
        for service in CLIENTS.values():
            fake.store.add_service(service, protocol="https")
        config = config_file(tmp_path, fake.url, TOKEN)
        result = ca_daemon("run", "--once", "--config", str(config), cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert set(fake.store.certificates) == {cert_id(n) for n in CLIENTS}
        for name, service_name in CLIENTS.items():
            service = fake.store.service(service_name)
            assert service is not None
            assert service["client_certificate"] == {"id": cert_id(name)}
        assert len(fake.store.ca_certificates) == 1


def test_a_stale_writer_does_not_take_kong_back(tmp_path: Path, kong: FakeKong) -> None:
    """Every entity carries the journal generation it was written from (a tag): a deposed
    leader resuming with the world it had derived before overwrites no newer client
    certificate and deletes no newer root's CA certificate (stand-in Kong, see the module)."""
    setup = kong_setup(tmp_path, kong)
    assert setup.engine.reconcile(now=NOW).ok
    loaded = setup.engine.journal.load()
    stale = desired_world(
        loaded.state, setup.settings, loaded.version, dict(loaded.credential_versions)
    )
    setup.engine.request_rotation("kong/payments", "test", now=NOW.replace(hour=13))
    assert setup.engine.reconcile(now=NOW.replace(hour=13, minute=1)).ok
    payments = cert_id("payments")
    renewed = dict(kong.store.certificates[payments])
    assert any(t.startswith("ca-daemon-generation:") for t in renewed["tags"])
    # The leader, mid-rotation, also trusts a second root.
    _, next_root = self_signed_root("next")
    current = setup.engine.journal.load()
    newer = replace(
        desired_world(
            current.state, setup.settings, current.version, dict(current.credential_versions)
        ),
        roots=(*stale.roots, next_root),
    )
    assert KongAdminPublisher(setup.settings.kong).publish(newer).errors == {}
    assert stable_id(next_root) in kong.store.ca_certificates
    writes = len(kong.store.writes)

    report = KongAdminPublisher(setup.settings.kong).publish(stale)
    assert "newer than this pass's" in report.errors[f"certificate/{payments}"]
    assert "newer than this pass's" in report.errors[f"ca_certificate/{stable_id(next_root)}"]
    assert kong.store.certificates[payments] == renewed
    assert stable_id(next_root) in kong.store.ca_certificates
    assert kong.store.writes[writes:] == []


def test_an_edited_certificate_is_drift_for_a_fresh_process_too(
    tmp_path: Path, kong: FakeKong
) -> None:
    """No memory of the last write is needed to see someone else's edit: the entity is
    tagged with the credential generation it was written for (stand-in Kong)."""
    setup = kong_setup(tmp_path, kong)
    assert setup.engine.reconcile(now=NOW).ok
    payments = cert_id("payments")
    published = dict(kong.store.certificates[payments])
    orders = dict(kong.store.certificates[cert_id("orders")])
    kong.store.certificates[payments] = {**published, "cert": orders["cert"], "key": orders["key"]}

    fresh = kong_setup(tmp_path, kong)  # another process: nothing remembered
    result = fresh.engine.reconcile(now=NOW.replace(minute=5))
    assert result.ok, result.errors
    assert only_report(result).drifted == [f"certificate/{payments}"]
    assert kong.store.certificates[payments]["cert"] == published["cert"]
