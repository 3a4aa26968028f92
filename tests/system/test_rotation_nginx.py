"""nginx as an upstream that verifies Kong's client certificates, across a root rotation.

nginx (``ssl_verify_client on``) trusts the published trust bundle and is reloaded
whenever the bundle changes, as an operator would. A proxy presents a Kong client
certificate the way Kong does (``proxy_ssl_certificate``): the one issued under the old
root, and the one issued under the new root. Both are accepted while the bundle holds
both roots; after retirement the old one is refused and the new one accepted.

nginx checks validity at the wall clock, so the engine's simulated clock starts at the
real now and moves only minutes: the propagation delay (2m) stays inside the 5m clock
skew that backdates not-before, so the new certificates are already valid in real
time, and the old client is refused for its root, not for its dates.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.journal.open import file_journal
from ca_daemon.model.state import Phase
from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.rotation.engine import Engine
from tests.support.invariants import InvariantChecker, read_directory
from tests.support.pki import issue, make_ca
from tests.support.rotation_harness import CheckedPublisher, Clock, LinkerdView
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.nginx import Nginx, NginxFactory
from tests.support.servers.tools import free_port

pytestmark = pytest.mark.integration

CLIENT = "payments"


def _settings(tmp_path: Path) -> Settings:
    renewal = {"lifetime": "30m", "rotate_before": "10m"}
    doc = {
        "anchor": {"local": {"dir": str(tmp_path / "data")}},
        "publish": {"kubernetes": {"enabled": False}},
        "root": {"lifetime": "240h", "rotate_before": "120h"},
        "linkerd": {"issuer": renewal},
        "kong": {
            "intermediate": {"lifetime": "100h", "rotate_before": "30h"},
            "clients": [
                {
                    "name": CLIENT,
                    "common_name": "kong.payments.upstream",
                    "dns_names": ["kong.kong.svc.cluster.local"],
                    **renewal,
                }
            ],
        },
        "rotation": {"propagation_delay": "2m", "clock_skew": "5m", "retire_delay": "auto"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_settings(path)


def _engine(settings: Settings, clock: Clock, linkerd_check: LinkerdCheck) -> Engine:
    out = settings.publish_directory
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)

    def linkerd_view() -> LinkerdView:
        return LinkerdView(
            *((out / "linkerd" / n).read_bytes() for n in ("ca.crt", "tls.crt", "tls.key"))
        )

    checked = CheckedPublisher(
        DirectoryPublisher(out),
        clock,
        InvariantChecker(settings.rotation.propagation_delay, settings.rotation.clock_skew),
        lambda: read_directory(out),
        linkerd_view,
        linkerd_check,
    )
    return Engine(
        settings,
        LocalAnchor(settings.anchor.local.dir, passphrase),
        file_journal(settings, passphrase),
        [checked],
        clock=clock,
    )


def _keep_client(out: Path, dest: Path) -> tuple[Path, Path]:
    """Copy the published client pair aside: the next issuance replaces it in place."""
    dest.mkdir()
    crt, key = dest / "tls.crt", dest / "tls.key"
    shutil.copyfile(out / "kong" / "clients" / CLIENT / "tls.crt", crt)
    shutil.copyfile(out / "kong" / "clients" / CLIENT / "tls.key", key)
    key.chmod(0o600)
    return crt, key


def _roots(out: Path) -> list[str]:
    pem = (out / "trust-bundle.pem").read_bytes()
    return [fingerprint(c) for c in parse_pem_certificates(pem)]


def _servers(
    upstream: int,
    proxy: int,
    bundle: Path,
    server: tuple[Path, Path],
    clients: dict[str, tuple[Path, Path]],
) -> str:
    locations = "".join(
        f"""
        location /{name}/ {{
            proxy_pass https://127.0.0.1:{upstream}/;
            proxy_ssl_certificate {crt};
            proxy_ssl_certificate_key {key};
        }}"""
        for name, (crt, key) in clients.items()
    )
    return f"""
    server {{
        listen 127.0.0.1:{upstream} ssl;
        ssl_certificate {server[0]};
        ssl_certificate_key {server[1]};
        ssl_client_certificate {bundle};
        ssl_verify_client on;
        ssl_verify_depth 3;
        location / {{ return 200 "hello $ssl_client_s_dn $ssl_client_i_dn\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{proxy};
        # One implicit upstream for every location: a resumed session would skip the
        # client-certificate check, so each request makes a full handshake.
        proxy_ssl_session_reuse off;{locations}
    }}
    """


def _status(proxy: int, name: str) -> int:
    return httpx.get(f"http://127.0.0.1:{proxy}/{name}/", timeout=10).status_code


def test_old_and_new_kong_client_certs_across_a_root_rotation(
    tmp_path: Path, nginx_factory: NginxFactory, linkerd_check: LinkerdCheck
) -> None:
    settings = _settings(tmp_path)
    out = settings.publish_directory
    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    engine = _engine(settings, clock, linkerd_check)
    assert engine.reconcile().ok
    old = _keep_client(out, tmp_path / "old-client")

    server_ca = make_ca("upstream-server-ca")
    server = issue(server_ca, "upstream.local", server=True, dns_names=("upstream.local",))
    server_files = server.write(tmp_path, "server")
    upstream, proxy = free_port(), free_port()
    bundle = out / "trust-bundle.pem"  # the published path, re-read on every reload
    nginx: Nginx = nginx_factory(_servers(upstream, proxy, bundle, server_files, {"old": old}))
    assert _status(proxy, "old") == 200

    # The rotation: the two-root bundle propagates; nginx is reloaded for it.
    engine.request_rotation("trust-anchor", "nginx drill")
    clock.now += timedelta(minutes=1)
    result = engine.reconcile()
    assert result.ok, result.errors
    assert result.state is not None and result.state.ca.phase is Phase.PROPAGATING
    assert len(_roots(out)) == 2
    nginx.reload()
    assert _status(proxy, "old") == 200

    # Activation: the client is re-issued under the new root; the bundle keeps both.
    clock.now += settings.rotation.propagation_delay
    result = engine.reconcile()
    new = _keep_client(out, tmp_path / "new-client")
    assert new[0].read_bytes() != old[0].read_bytes()
    clients = {"old": old, "new": new}
    nginx.reload(_servers(upstream, proxy, bundle, server_files, clients))
    assert _status(proxy, "old") == 200, "the old client, while the bundle holds both roots"
    assert _status(proxy, "new") == 200, "the new client, while the bundle holds both roots"
    assert result.ok, result.errors
    assert result.state is not None and result.state.ca.phase is Phase.RETIRING
    assert len(_roots(out)) == 2

    # Retirement, once nothing under the old chain is valid in the daemon's time.
    rotation = result.state.ca.rotation
    assert rotation is not None and rotation.retire_after is not None
    clock.now = rotation.retire_after
    result = engine.reconcile()
    nginx.reload()
    assert _status(proxy, "old") == 400, "the old client after retirement"
    assert _status(proxy, "new") == 200, "the new client after retirement"
    assert result.ok, result.errors
    assert result.state is not None and result.state.ca.phase is Phase.STEADY
    (root,) = result.state.ca.roots
    assert _roots(out) == [fingerprint(root.cert)]
    # Refused for its root, not its dates: the old chain is still valid in real time.
    now = datetime.now(UTC)
    for cert in parse_pem_certificates(old[0].read_bytes()):
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
