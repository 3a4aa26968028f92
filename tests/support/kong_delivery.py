"""The daemon delivering to the Kong stand-in through the Admin API (kong.delivery:
admin-api): the stand-in with its token and the clients' Services, the configuration,
and an engine on the local anchor publishing there."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.journal.open import file_journal
from ca_daemon.model.state import State
from ca_daemon.pki.bundle import KONG_ID_NAMESPACE
from ca_daemon.publish.base import PublishReport
from ca_daemon.publish.kong_admin import KongAdminPublisher
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.results import PassResult
from tests.support.clock import NOW
from tests.support.fake_kong_admin import FakeKong, serve

TOKEN = "kong-admin-test-token"
CLIENTS = {"payments": "payments-api", "orders": "orders-api"}


def cert_id(name: str) -> str:
    """Computed here independently of the publisher: the id must never change."""
    return str(uuid.uuid5(KONG_ID_NAMESPACE, f"kong-client:{name}"))


@dataclass
class Setup:
    kong: FakeKong
    settings: Settings
    engine: Engine
    publisher: KongAdminPublisher


@contextmanager
def kong_stand_in() -> Iterator[FakeKong]:
    """The Kong stand-in (no Kong runs here) with the token and the clients' Services."""
    with serve() as fake:
        fake.store.token = TOKEN
        fake.store.clock = lambda: NOW
        for service in CLIENTS.values():
            fake.store.add_service(service, protocol="https")
        yield fake


def _settings(tmp_path: Path, url: str, token: str, ca_cert: Path | None) -> Settings:
    return load_settings(config_file(tmp_path, url, token, ca_cert))


def config_file(tmp_path: Path, url: str, token: str, ca_cert: Path | None = None) -> Path:
    token_file = tmp_path / "kong-token"
    token_file.write_text(token + "\n")
    admin_api = {"url": url, "token_file": str(token_file)}
    if ca_cert is not None:
        admin_api["ca_cert"] = str(ca_cert)
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(tmp_path / "data")}},
                "publish": {"kubernetes": {"enabled": False}},
                "kong": {
                    "delivery": "admin-api",
                    "admin_api": admin_api,
                    "clients": [
                        {"name": name, "common_name": f"kong.{name}.upstream", "service": svc}
                        for name, svc in CLIENTS.items()
                    ],
                },
            }
        )
    )
    return path


def kong_setup(
    tmp_path: Path,
    kong: FakeKong,
    url: str | None = None,
    token: str = TOKEN,
    ca_cert: Path | None = None,
) -> Setup:
    settings = _settings(tmp_path, url or kong.url, token, ca_cert)
    data = settings.anchor.local.dir
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    publisher = KongAdminPublisher(settings.kong)
    engine = Engine(
        settings,
        LocalAnchor(data, passphrase),
        file_journal(settings, passphrase),
        [publisher],
    )
    return Setup(kong, settings, engine, publisher)


def only_report(result: PassResult) -> PublishReport:
    """The one publisher's report of a pass."""
    (report,) = result.reports
    return report


def state_of(result: PassResult) -> State:
    assert result.state is not None
    return result.state
