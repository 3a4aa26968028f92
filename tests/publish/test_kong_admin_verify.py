"""Kong Admin API delivery: ``verify_upstream`` and reading back what Kong holds.

Kong is the stand-in of tests/support/fake_kong_admin.py (no Kong runs here). A Service
that verifies its upstream lists CA Certificate ids in ``ca_certificates`` (an array of
UUIDs, not a foreign key: kong/db/schema/entities/services.lua) with ``tls_verify`` on.
A write Kong answers as accepted is read back; holding something else is a failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.loading import load_settings
from ca_daemon.journal.open import file_journal
from ca_daemon.model.world import desired_world
from ca_daemon.pki.bundle import stable_id
from ca_daemon.publish.kong_admin import KongAdminPublisher
from ca_daemon.rotation.engine import Engine
from tests.support.clock import NOW
from tests.support.fake_kong_admin import Entity, FakeKong
from tests.support.kong_delivery import (
    TOKEN,
    cert_id,
    config_file,
    kong_stand_in,
    only_report,
    state_of,
)
from tests.support.pki import self_signed_root

pytestmark = pytest.mark.integration


@pytest.fixture
def kong() -> Iterator[FakeKong]:
    with kong_stand_in() as fake:
        yield fake


def _engine(tmp_path: Path, kong: FakeKong) -> tuple[Engine, KongAdminPublisher]:
    """The daemon on the local anchor; payments verifies its upstream, orders does not."""
    path = config_file(tmp_path, kong.url, TOKEN)
    config = yaml.safe_load(path.read_text())
    for client in config["kong"]["clients"]:
        client["verify_upstream"] = client["name"] == "payments"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(path)
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    publisher = KongAdminPublisher(settings.kong)
    anchor = LocalAnchor(settings.anchor.local.dir, passphrase)
    return Engine(settings, anchor, file_journal(settings, passphrase), [publisher]), publisher


def _service(kong: FakeKong, name: str) -> Entity:
    service = kong.store.service(name)
    assert service is not None
    return service


def test_a_verifying_service_lists_every_root_and_verifies(tmp_path: Path, kong: FakeKong) -> None:
    engine, publisher = _engine(tmp_path, kong)
    first = engine.reconcile(now=NOW)
    assert first.ok, first.errors
    (root,) = (r.cert for r in state_of(first).ca.roots)
    payments = _service(kong, "payments-api")
    assert payments["ca_certificates"] == [stable_id(root)]
    assert payments["tls_verify"] is True
    assert payments["client_certificate"] == {"id": cert_id("payments")}
    assert stable_id(root) in kong.store.ca_certificates
    orders = _service(kong, "orders-api")  # does not verify: left alone
    assert orders["ca_certificates"] is None and orders["tls_verify"] is None
    writes = list(kong.store.writes)
    assert engine.reconcile(now=NOW.replace(hour=13)).ok
    assert kong.store.writes == writes  # nothing differed, nothing written

    # A root rotation's overlap: both roots listed; then the old one retires, is taken
    # off the Service and, no longer referenced, deleted.
    world = desired_world(state_of(first), engine.settings)
    _, new = self_signed_root("root.linkerd.next")
    overlap = publisher.publish(replace(world, roots=(root, new)))
    assert overlap.errors == {}
    assert sorted(payments["ca_certificates"]) == sorted([stable_id(root), stable_id(new)])
    retired = publisher.publish(replace(world, roots=(new,)))
    assert retired.errors == {}
    assert payments["ca_certificates"] == [stable_id(new)]
    assert set(kong.store.ca_certificates) == {stable_id(new)}
    assert f"ca_certificate/{stable_id(root)} (deleted)" in retired.changed


def test_a_service_edited_to_trust_less_is_drift_and_repaired(
    tmp_path: Path, kong: FakeKong
) -> None:
    engine, _ = _engine(tmp_path, kong)
    assert engine.reconcile(now=NOW).ok
    payments = _service(kong, "payments-api")
    trusted = list(payments["ca_certificates"])
    payments.update(ca_certificates=None, tls_verify=False)

    result = engine.reconcile(now=NOW.replace(hour=13))
    assert result.ok, result.errors
    assert only_report(result).drifted == ["service/payments-api"]
    assert payments["ca_certificates"] == trusted and payments["tls_verify"] is True


@pytest.mark.parametrize(
    ("collection", "tamper", "differ"),
    [
        # A proxy (or a plugin) that rewrites what it passes on, answering as Kong would.
        ("certificates", lambda body: {**body, "key_alt": "x", "cert_alt": "y"}, "cert_alt"),
        ("ca_certificates", lambda body: {**body, "tags": ["someone-else"]}, "tags"),
        ("services", lambda body: {**body, "ca_certificates": []}, "ca_certificates"),
        ("services", lambda body: {**body, "client_certificate": None}, "client_certificate"),
    ],
    ids=["certificate", "ca-certificate", "service-ca-list", "service-client-cert"],
)
def test_a_write_kong_answers_but_does_not_hold_is_a_publish_failure(
    tmp_path: Path, kong: FakeKong, collection: str, tamper: Any, differ: str
) -> None:
    payments = cert_id("payments")
    target = {
        "certificates": f"/certificates/{payments}",
        "ca_certificates": None,  # the one root's, whatever its id
        "services": "/services/payments-api",
    }[collection]

    def rewrite(method: str, path: str, body: Entity) -> Entity | None:
        if path == target or (target is None and path.startswith(f"/{collection}/")):
            return dict(tamper(body))
        return None

    kong.store.rewrite = rewrite
    engine, _ = _engine(tmp_path, kong)
    result = engine.reconcile(now=NOW)
    assert not result.ok
    report = only_report(result)
    state = state_of(result)
    (root,) = (r.cert for r in state.ca.roots)
    obj = {
        "certificates": f"certificate/{payments}",
        "ca_certificates": f"ca_certificate/{stable_id(root)}",
        "services": "service/payments-api",
    }[collection]
    assert "Kong accepted the" in report.errors[obj]
    assert "holds something else" in report.errors[obj]
    assert differ in report.errors[obj]
    assert obj not in report.changed  # not counted as published
    assert any(obj in e for e in result.errors)
    if collection != "services":
        # What would point at it was not changed: the Service is left as it was.
        assert _service(kong, "payments-api")["client_certificate"] is None
    keys = [e.key_pem.decode() for e in state.kong_clients.values()]
    lines = {ln for k in keys for ln in k.splitlines() if ln and not ln.startswith("-----")}
    assert not any(line in text for text in result.errors for line in lines)

    kong.store.rewrite = None  # Kong behaves again: the next pass puts it right
    again = engine.reconcile(now=NOW.replace(hour=13))
    assert again.ok, again.errors
    assert _service(kong, "payments-api")["ca_certificates"] == [stable_id(root)]


def test_a_stale_writer_does_not_take_a_root_off_a_service(tmp_path: Path, kong: FakeKong) -> None:
    engine, _ = _engine(tmp_path, kong)
    assert engine.reconcile(now=NOW).ok
    loaded = engine.journal.load()
    stale = desired_world(loaded.state, engine.settings, loaded.version)
    _, new = self_signed_root("root.linkerd.next")
    newer = replace(stale, roots=(*stale.roots, new), generation=loaded.version + 5)
    assert KongAdminPublisher(engine.settings.kong).publish(newer).errors == {}
    payments = _service(kong, "payments-api")
    both = list(payments["ca_certificates"])
    assert len(both) == 2
    payments["tags"] = ["team-payments", *payments["tags"]]

    report = KongAdminPublisher(engine.settings.kong).publish(stale)
    assert "newer than this pass's" in report.errors["service/payments-api"]
    assert payments["ca_certificates"] == both
    assert "team-payments" in payments["tags"]  # the Service's own tags are kept
