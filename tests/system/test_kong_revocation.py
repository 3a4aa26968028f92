"""Revoking a Kong client whose key leaked: `rotate kong/<name> --revoke`.

The client is re-issued, published, and only then is the certificate it replaced
revoked in the anchor; the CRL of every CA in the bundle is published next to it
(`crl.pem`). Judged by nginx with `ssl_crl` (OpenSSL checks a CRL for every CA of the
chain): the revoked certificate is refused, the re-issued one accepted. With the Vault
anchor, Vault itself lists the serial as revoked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ca_daemon.config.loading import load_settings
from ca_daemon.model.state import OpState
from ca_daemon.pki.bundle import parse_pem_certificates
from ca_daemon.pki.crl import parse_crls
from ca_daemon.rotation.engine import Engine
from ca_daemon.service.wiring import build_engine
from tests.support.kube_cluster import b64, published_cluster
from tests.support.pki import issue, make_ca
from tests.support.rotation_configs import short_lifetimes
from tests.support.servers.kube import Kube
from tests.support.servers.nginx import NginxFactory
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import free_port, unique
from tests.support.vault_helpers import bao_json, vault_config

pytestmark = pytest.mark.integration


def _revoke(engine: Engine, out: Path) -> tuple[tuple[str, str], tuple[str, str], int]:
    """Revoke payments; (old cert chain, key), (new ...), the old serial."""
    assert engine.reconcile().ok
    client = out / "kong" / "clients" / "payments"
    old = ((client / "tls.crt").read_text(), (client / "tls.key").read_text())
    old_serial = parse_pem_certificates(old[0])[0].serial_number
    assert not (out / "crl.pem").exists()  # nothing revoked yet: no CRL published
    op_id = engine.request_rotation("kong/payments", "key leaked", revoke=True)
    for _ in range(5):
        result = engine.reconcile()
        assert result.ok, result.errors
        assert result.state is not None
        op = result.state.ca.operation(op_id)
        assert op is not None
        if not op.open:
            break
    assert op.state is OpState.SUCCEEDED, op
    assert f"revoked serial {old_serial:x}" in (op.result or "")
    new = ((client / "tls.crt").read_text(), (client / "tls.key").read_text())
    assert new[0] != old[0]
    return old, new, old_serial


def _nginx_refuses_old_accepts_new(
    nginx_factory: NginxFactory,
    out: Path,
    tmp_path: Path,
    old: tuple[str, str],
    new: tuple[str, str],
) -> None:
    """nginx as the upstream (the published bundle and CRLs in `out`), and as the proxy
    presenting each client certificate as Kong does: the re-issued certificate is accepted,
    the revoked one refused."""
    conf = tmp_path / "nginx"
    conf.mkdir()
    for name, (crt, key) in {"old": old, "new": new}.items():
        (conf / f"{name}.crt").write_text(crt)
        (conf / f"{name}.key").write_text(key)
        (conf / f"{name}.key").chmod(0o600)
    server = issue(make_ca("upstream-server-ca"), "upstream.local", server=True)
    server_crt, server_key = server.write(conf, "server")
    upstream, proxy = free_port(), free_port()
    locations = "\n".join(
        f"""        location /{name}/ {{
            proxy_pass https://127.0.0.1:{upstream}/;
            proxy_ssl_certificate {conf / f"{name}.crt"};
            proxy_ssl_certificate_key {conf / f"{name}.key"};
        }}"""
        for name in ("old", "new")
    )
    nginx_factory(
        f"""
    server {{
        listen 127.0.0.1:{upstream} ssl;
        ssl_certificate {server_crt};
        ssl_certificate_key {server_key};
        ssl_client_certificate {out / "trust-bundle.pem"};
        ssl_crl {out / "crl.pem"};
        ssl_verify_client on;
        ssl_verify_depth 2;
        location / {{ return 200 "hello $ssl_client_serial\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{proxy};
        proxy_ssl_session_reuse off;
{locations}
    }}
    """
    )
    judged = {n: httpx.get(f"http://127.0.0.1:{proxy}/{n}/", timeout=10) for n in ("old", "new")}
    assert judged["new"].status_code == 200, judged["new"].text
    assert judged["old"].status_code == 400 and "SSL certificate error" in judged["old"].text


def _check_crls(out: Path, old_serial: int) -> None:
    """One CRL per CA of the bundle (the root and its Kong intermediate); the old serial
    is in exactly one, the intermediate's."""
    crls = parse_crls((out / "crl.pem").read_text())
    roots = parse_pem_certificates((out / "trust-bundle.pem").read_text())
    assert len(crls) == 2 * len(roots)
    listed = [c for c in crls if c.get_revoked_certificate_by_serial_number(old_serial)]
    assert len(listed) == 1 and "kong-upstream" in listed[0].issuer.rfc4514_string()


def test_a_revoked_client_is_refused_by_nginx_with_the_published_crl_local(
    tmp_path: Path, nginx_factory: NginxFactory
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(short_lifetimes(tmp_path)))
    settings = load_settings(config)
    engine = build_engine(settings)
    out = settings.publish_directory
    old, new, old_serial = _revoke(engine, out)
    _check_crls(out, old_serial)
    _nginx_refuses_old_accepts_new(nginx_factory, out, tmp_path, old, new)


def test_vault_lists_the_revoked_serial_and_nginx_refuses_it(
    tmp_path: Path, openbao: OpenBao, nginx_factory: NginxFactory
) -> None:
    config = vault_config(tmp_path, openbao, unique("revoke"))
    settings = load_settings(config)
    engine = build_engine(settings)
    out = settings.publish_directory
    old, new, old_serial = _revoke(engine, out)
    revoked: Any = bao_json(openbao, "list", f"{settings.anchor.vault.kong_mount}/certs/revoked")
    # Vault lists a serial as its big-endian bytes in lowercase hex, colon-separated.
    serial = old_serial.to_bytes((old_serial.bit_length() + 7) // 8, "big")
    assert serial.hex(":") in revoked, revoked
    _check_crls(out, old_serial)
    _nginx_refuses_old_accepts_new(nginx_factory, out, tmp_path, old, new)


def test_the_bundle_configmap_carries_the_crls_for_an_upstream(
    tmp_path: Path, kube: Kube, nginx_factory: NginxFactory
) -> None:
    """Published to Kubernetes: the bundles[] ConfigMap gets the key crl.pem beside the
    bundle, as the daemon's ServiceAccount (the RBAC of `config rbac`) writes it, and an
    upstream configured from that ConfigMap alone refuses the revoked client."""
    c = published_cluster(kube, tmp_path, "revoke")
    engine = c.engine()
    assert engine.reconcile().ok
    client = c.secret(c.app_ns, "kong-upstream-payments")
    old = (b64(client, "tls.crt"), b64(client, "tls.key"))
    op_id = engine.request_rotation("kong/payments", "key leaked", revoke=True)
    for _ in range(5):
        assert engine.reconcile().ok
    op = engine.journal.load_ca()[0].operation(op_id)
    assert op is not None and op.state is OpState.SUCCEEDED, op
    client = c.secret(c.app_ns, "kong-upstream-payments")
    new = (b64(client, "tls.crt"), b64(client, "tls.key"))
    data = c.configmap(c.bundle_ns, "upstream-trust")["data"]
    assert set(data) == {"ca-bundle.crt", "crl.pem"}
    served = tmp_path / "served"
    served.mkdir()
    (served / "trust-bundle.pem").write_text(data["ca-bundle.crt"])
    (served / "crl.pem").write_text(data["crl.pem"])
    _check_crls(served, parse_pem_certificates(old[0])[0].serial_number)
    _nginx_refuses_old_accepts_new(nginx_factory, served, tmp_path, old, new)
