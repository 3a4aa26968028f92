"""The daemon's wire to Vault (``ca_daemon.anchor.vault.http``) against the real OpenBao:
kept-alive connections shared by the threads of a batch, redirects followed (through a
real nginx answering 307, as a standby Vault that does not forward would), and the same
errors as before for an unknown path, a refusal and no server at all."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ca_daemon.anchor.vault.client import VaultClient, VaultForbidden, VaultNotFound
from ca_daemon.anchor.vault.http import VaultHttp
from ca_daemon.config.settings import VaultAnchor, VaultAuth
from ca_daemon.errors import AnchorError
from tests.support.pki import issue, make_ca
from tests.support.servers.nginx import NginxFactory
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import free_port, unique

pytestmark = pytest.mark.integration


def client(address: str, token: str, pool_size: int = 8) -> VaultClient:
    return VaultClient(
        VaultAnchor(address=address, auth=VaultAuth(token=token)), pool_size=pool_size
    )


def test_a_batch_shares_a_few_kept_alive_connections(openbao: OpenBao) -> None:
    vault = client(openbao.address, openbao.token, pool_size=4)
    base = unique("pool")

    def work(i: int) -> None:
        body = {"options": {"cas": 0}, "data": {"state": {"i": i}}}
        vault.write(f"secret/data/{base}/r{i}", "write", body)
        assert vault.read(f"secret/data/{base}/r{i}", "read") is not None

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(work, range(60)))
    pool_stats = vault.http._pool
    assert pool_stats is not None
    # 120 requests on 4 threads: at most one connection per thread was ever opened.
    assert 1 <= pool_stats.num_connections <= 4
    assert pool_stats.num_requests == 120


def test_a_redirect_to_the_active_node_is_followed_with_its_body(
    openbao: OpenBao, nginx_factory: NginxFactory
) -> None:
    port = free_port()
    nginx_factory(
        f"server {{ listen 127.0.0.1:{port}; return 307 {openbao.address}$request_uri; }}"
    )
    vault = client(f"http://127.0.0.1:{port}", openbao.token)
    path = f"secret/data/{unique('redirect')}"
    written = vault.write(path, "write", {"options": {"cas": 0}, "data": {"state": {"a": 1}}})
    assert written["version"] == 1
    data = vault.read(path, "read")
    assert data is not None and data["data"] == {"state": {"a": 1}}


def test_errors_are_the_ones_the_caller_acts_on(openbao: OpenBao) -> None:
    vault = client(openbao.address, openbao.token)
    assert vault.read(f"secret/data/{unique('absent')}", "read") is None
    with pytest.raises(VaultNotFound, match="no handler for route"):
        vault.request("GET", "no-such-mount/x", "read a path")
    # A valid token whose policy (only "default") does not reach sys/mounts.
    made = openbao.cli("token", "create", "-policy=default", "-format=json")
    limited = json.loads(made.stdout)["auth"]["client_token"]
    with pytest.raises(VaultForbidden, match="permission denied"):
        client(openbao.address, limited).request("GET", "sys/mounts", "list secret engines")
    # Logged in, then the server is gone: the wire's own error, named by its type only.
    vault.http = VaultHttp(
        f"http://127.0.0.1:{free_port()}", namespace=None, ca_cert=None, timeout=5, pool_size=1
    )
    with pytest.raises(AnchorError, match=r"unreachable \(NewConnectionError\)") as caught:
        vault.request("GET", "sys/mounts", "list secret engines")
    assert openbao.token not in str(caught.value)


def test_tls_is_verified_against_ca_cert_decided_once(
    openbao: OpenBao, nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    """Vault behind TLS (a real nginx terminating it in front of the real OpenBao): the
    daemon's requests trust exactly ``anchor.vault.ca_cert``."""
    ca = make_ca("vault test CA")
    serving = issue(ca, "vault", server=True, ips=("127.0.0.1",))
    ca_file, _ = ca.write(tmp_path, "ca")
    crt, key = serving.write(tmp_path, "serving")
    port = free_port()
    nginx_factory(
        f"""server {{
            listen 127.0.0.1:{port} ssl;
            ssl_certificate {crt};
            ssl_certificate_key {key};
            location / {{ proxy_pass {openbao.address}; }}
        }}"""
    )
    address = f"https://127.0.0.1:{port}"
    auth = VaultAuth(token=openbao.token)
    trusted = VaultClient(VaultAnchor(address=address, auth=auth, ca_cert=ca_file))
    path = f"secret/data/{unique('tls')}"
    assert trusted.write(path, "write", {"options": {"cas": 0}, "data": {"state": {}}})
    assert trusted.read(path, "read") is not None

    other_ca, _ = make_ca("some other CA").write(tmp_path, "other")
    wrong = VaultClient(VaultAnchor(address=address, auth=auth, ca_cert=other_ca))
    # Logged in over the trusted wire, then a wire that trusts another CA: refused.
    trusted.http = wrong.http
    with pytest.raises(AnchorError, match=r"unreachable \(SSLError\)"):
        trusted.request("GET", "sys/mounts", "list secret engines")
