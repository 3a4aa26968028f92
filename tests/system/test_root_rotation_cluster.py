"""Root rotation on real OpenBao and the real kube-apiserver (SPEC "Root rotation").

1. A whole manual rotation with Kubernetes publishing, the invariants and Linkerd's
   validation checked after every publish, Vault's default issuers and Kong's Secrets
   followed through it.
2. The pods gate: one meshed Pod keeps the old bundle, and the issuer stays under the
   old root (the Pod named in the result, the journal and one Warning Event) until it
   is re-created; the control plane is rolled after the confirmation and before the
   new issuer appears.
3. The shipped Vault policy (AppRole) carries a whole rotation, and refuses the rest.

See tests/support/cluster_rotation.py for why the clock follows the wall clock
until activation and jumps ahead afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from ca_daemon.anchor.vault.client import VaultClient
from ca_daemon.anchor.vault.pki import VaultPkiAnchor
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import VaultAnchor, VaultAuth
from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.model.state import OpState, Phase, RootRole
from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.publish.linkerd_rollout import PENDING_REASON
from ca_daemon.publish.pods_gate import pending_event_name
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.results import PassResult
from tests.support.cluster_rotation import (
    HOUR,
    LINKERD_DEPLOYMENTS,
    TRUST_ROOTS,
    VAULT_BACKDATE,
    Daemon,
    Mesh,
    RotationCluster,
    VaultAdmin,
    daemon,
    follow_wall_clock,
    make_rotation_cluster,
    parse_stamp,
    rotation_config,
    stamp,
    wall_clock,
)
from tests.support.invariants import InvariantChecker, read_directory
from tests.support.rotation_harness import CheckedPublisher, Clock, LinkerdView
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.openbao import OpenBao, own_openbao

pytestmark = pytest.mark.integration

POLICY = Path(__file__).resolve().parents[2] / "policies" / "vault-policy.hcl"
ROTATION_STEPS = [
    "PrepareRoot",
    "Propagate",
    "ConfirmBundle",
    "NoteRestart",
    "RestartLinkerd",
    "Activate",
    "StartRetiring",
    "Retire",
]
# Passes on the wall clock before activation: the 3s propagation delay at 0.5s a pass,
# with room for a slow machine.
WALL_PASSES = 40
JUMP = 6 * HOUR  # after activation: renewals (issuer 32h, clients 40h) and retirement (~60h)


def _pass(d: Daemon) -> PassResult:
    result = d.engine.reconcile()
    assert result.ok, (d.clock.now, result.errors)
    assert result.state is not None
    return result


def _compress(phases: list[Phase]) -> list[Phase]:
    return [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] is not p]


def _rotation_actions(results: list[PassResult]) -> list[str]:
    return [s.action for r in results for s in r.steps if s.action in ROTATION_STEPS]


def _start(
    kube: Kube, openbao: OpenBao, workdir: Path, prefix: str, linkerd_check: LinkerdCheck
) -> tuple[RotationCluster, Daemon, Mesh, PassResult]:
    """A cluster whose Linkerd control plane started an hour ago, then the first pass."""
    cluster = make_rotation_cluster(
        kube, VaultAdmin(openbao.address, openbao.token), workdir, prefix
    )
    d = daemon(cluster, linkerd_check)
    mesh = Mesh(kube, cluster.linkerd_ns, cluster.app_ns)
    mesh.control_plane(started=d.clock.now - HOUR)
    return cluster, d, mesh, _pass(d)


def test_full_root_rotation_on_openbao_and_kubernetes(
    kube: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    c, d, mesh, first = _start(kube, openbao, tmp_path, "rot", linkerd_check)
    assert first.state is not None
    old_root, old_inter = first.state.ca.active_root, first.state.ca.active_intermediate
    assert old_root is not None and old_inter is not None
    old_fp = fingerprint(old_root.cert)
    one_root = c.bundle_pem()
    for app in ("web", "api"):
        mesh.app(app, one_root, started=d.clock.now)
    assert c.vault.default_issuer(c.root_mount) == old_root.ref
    assert c.vault.default_issuer(c.kong_mount) == old_inter.ref
    assert set(c.kong_ca_secrets().values()) == {old_fp}
    uids = c.client_uids()

    operation = d.engine.request_rotation("trust-anchor", "drill")
    results = [first]
    reinjected = False
    for _ in range(WALL_PASSES):
        follow_wall_clock(d.clock)
        result = _pass(d)
        results.append(result)
        assert result.state is not None
        ca = result.state.ca
        if ca.phase is not Phase.PROPAGATING:
            break
        # Nothing is signed by the next root yet: Vault's defaults stay on the old chain,
        # and Kong trusts both roots.
        nxt = ca.root(RootRole.NEXT)
        assert nxt is not None and nxt.ref != old_root.ref
        assert c.vault.default_issuer(c.root_mount) == old_root.ref
        assert c.vault.default_issuer(c.kong_mount) == old_inter.ref
        assert set(c.kong_ca_secrets().values()) == {old_fp, fingerprint(nxt.cert)}
        # What Kubernetes does meanwhile: rolled Deployments get new Pods, and the apps'
        # owners re-create theirs, injected from the ConfigMap that now holds both roots.
        mesh.follow_restarts(c.restarted_at())
        if not reinjected:
            two_roots = c.bundle_pem()
            assert len(parse_pem_certificates(two_roots)) == 2
            for app in ("web", "api"):
                mesh.app(app, two_roots, started=d.clock.now)
            reinjected = True
    else:
        raise AssertionError(f"still propagating after {WALL_PASSES} passes: {result.waiting}")

    # Activated (and, everything re-issued in the same pass, retiring).
    assert result.state is not None
    ca = result.state.ca
    assert ca.phase is Phase.RETIRING, ca.phase
    new_root, new_inter = ca.active_root, ca.active_intermediate
    assert new_root is not None and new_inter is not None
    new_fp = fingerprint(new_root.cert)
    assert new_root.ref != old_root.ref and new_inter.ref != old_inter.ref
    assert directly_issued_by(new_inter.cert, new_root.cert)
    assert c.vault.default_issuer(c.root_mount) == new_root.ref
    assert c.vault.default_issuer(c.kong_mount) == new_inter.ref
    assert c.vault.issuer_cert(c.root_mount, old_root.ref) == old_root.cert  # kept, not default
    assert directly_issued_by(c.issuer_cert(), new_root.cert)

    # Retiring on a clock jumping ahead: both roots stay in Kong until the old one retires.
    for _ in range(20):
        assert set(c.kong_ca_secrets().values()) == {old_fp, new_fp}
        d.clock.now += JUMP
        result = _pass(d)
        results.append(result)
        assert result.state is not None
        if result.state.ca.phase is Phase.STEADY:
            break
    else:
        raise AssertionError(f"never retired: {result.waiting}")

    phases = [r.state.ca.phase for r in results if r.state is not None]
    assert _compress(phases) == [Phase.STEADY, Phase.PROPAGATING, Phase.RETIRING, Phase.STEADY]
    assert _rotation_actions(results) == ROTATION_STEPS
    # After retirement: one root everywhere, the old Kong CA Secret deleted.
    assert [fingerprint(r) for r in parse_pem_certificates(c.bundle_pem())] == [new_fp]
    assert set(c.kong_ca_secrets().values()) == {new_fp}
    # Kong client Secrets were updated in place, and now hold chains under the new root.
    assert c.client_uids() == uids
    chains = c.read_cluster().clients
    assert set(chains) == set(c.clients)
    for name, chain in chains.items():
        assert chain[1] == new_inter.cert, name
    # The old root stays in Vault, not default; no other root or intermediate was made.
    assert c.vault.issuer_names(c.root_mount) == sorted([old_root.ref, new_root.ref])
    assert c.vault.issuer_names(c.kong_mount) == sorted([old_inter.ref, new_inter.ref])
    assert c.vault.default_issuer(c.root_mount) == new_root.ref
    state = d.engine.journal.load().state
    op = state.ca.operation(operation)
    assert op is not None and op.state is OpState.SUCCEEDED, op
    # Checked after every publish, Linkerd's validation included.
    assert d.checked.checks >= len(results)
    assert len(d.checked.linkerd_outputs) == d.checked.checks


def test_pods_gate_holds_the_new_issuer_until_the_last_pod_has_the_bundle(
    kube: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    c, d, mesh, first = _start(kube, openbao, tmp_path, "gate", linkerd_check)
    assert first.state is not None
    old_root = first.state.ca.active_root
    assert old_root is not None
    one_root = c.bundle_pem()
    mesh.app("web", one_root, started=d.clock.now)
    laggard = mesh.app("billing", one_root, started=d.clock.now)

    d.engine.request_rotation("trust-anchor", "gate drill")
    delay = c.settings.rotation.propagation_delay
    reinjected = False
    results: list[PassResult] = []
    for _ in range(WALL_PASSES):
        follow_wall_clock(d.clock)
        result = _pass(d)
        results.append(result)
        assert result.state is not None
        rotation = result.state.ca.rotation
        assert result.state.ca.phase is Phase.PROPAGATING, result.state.ca.phase
        assert rotation is not None
        mesh.follow_restarts(c.restarted_at())
        if not reinjected:  # every app but billing is re-created with the two-root bundle
            mesh.app("web", c.bundle_pem(), started=d.clock.now)
            reinjected = True
        confirmed = rotation.confirmed_at
        if confirmed is not None and d.clock.now >= confirmed + delay + timedelta(seconds=1):
            break
    else:
        raise AssertionError("the propagation delay never passed")

    # The delay is over, but billing still trusts only the old root: the rotation waits.
    for _ in range(3):
        follow_wall_clock(d.clock)
        result = _pass(d)
        results.append(result)
        assert result.state is not None and result.state.ca.rotation is not None
        assert result.state.ca.phase is Phase.PROPAGATING
        assert result.pending_pods == (laggard,)
        assert result.waiting is not None and laggard in result.waiting
        assert result.state.ca.rotation.pending_pods == (laggard,)  # journaled, for status
        assert directly_issued_by(c.issuer_cert(), old_root.cert)
        assert c.vault.default_issuer(c.root_mount) == old_root.ref
    events = c.get(f"/api/v1/namespaces/{c.linkerd_ns}/events")["items"]
    ours = [e for e in events if e["reason"] == PENDING_REASON]
    assert len(ours) == 1, ours
    assert ours[0]["metadata"]["name"] == pending_event_name(TRUST_ROOTS)
    assert ours[0]["type"] == "Warning"
    assert laggard in ours[0]["message"] and "1 meshed pod(s)" in ours[0]["message"]

    # Its owner re-creates it; injected now, it gets both roots, and activation proceeds.
    mesh.app("billing", c.bundle_pem(), started=d.clock.now)
    follow_wall_clock(d.clock)
    result = _pass(d)
    results.append(result)
    assert "Activate" in [s.action for s in result.steps]
    assert result.state is not None
    new_root = result.state.ca.active_root
    assert new_root is not None and new_root.ref != old_root.ref
    assert directly_issued_by(c.issuer_cert(), new_root.cert)

    # Order: two-root bundle confirmed -> control plane rolled -> new issuer published.
    (restart,) = d.rollout.restarts
    assert restart.confirmed_at is not None  # journaled before the roll
    assert restart.at >= restart.confirmed_at
    assert sorted(restart.rolled) == [f"deployment/{c.linkerd_ns}/{n}" for n in LINKERD_DEPLOYMENTS]
    assert set(c.restarted_at().values()) == {stamp(restart.at)}
    snapshots = d.watch.snapshots
    new_fp = fingerprint(new_root.cert)
    first_new = next(i for i, s in enumerate(snapshots) if s.issuer_root == new_fp)
    first_rolled = next(
        i for i, s in enumerate(snapshots) if all(v is not None for v in s.restarted_at.values())
    )
    assert restart.publishes_before <= first_rolled < first_new
    assert all(s.issuer_root == fingerprint(old_root.cert) for s in snapshots[:first_new])
    assert snapshots[first_new].at >= restart.confirmed_at + delay
    rolled_at = {parse_stamp(v) for v in snapshots[first_new].restarted_at.values() if v}
    assert rolled_at == {restart.at}
    print(  # the observed order, for the record (pytest -rP)
        f"confirmed_at={stamp(restart.confirmed_at)} restartedAt={stamp(restart.at)} "
        f"(publish #{first_rolled} first shows it) new-root issuer first in publish "
        f"#{first_new} at {stamp(snapshots[first_new].at)}"
    )


# --- the shipped Vault policy ---------------------------------------------------------------


@dataclass(frozen=True)
class PolicyVault:
    """A private OpenBao where the daemon logs in by AppRole bound only to the policy.

    Its own server: the policy pins the default names (pki-root, pki-kong,
    secret/ca-daemon/state), which the shared server's other tests also use."""

    address: str
    admin_token: str
    role_id: str
    secret_id_file: Path

    def login(self) -> hvac.Client:
        client = hvac.Client(url=self.address)
        client.auth.approle.login(
            role_id=self.role_id, secret_id=self.secret_id_file.read_text().strip()
        )
        return client


@pytest.fixture(scope="module")
def policy_vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyVault]:
    workdir = tmp_path_factory.mktemp("policy-bao")
    with own_openbao(workdir, "bao (policy)") as server:
        address, token, bao_cli = server.address, server.token, server.cli
        # The administrator's one-time set-up: mounts and role (what create_if_missing
        # does), the policy, an AppRole bound to it alone.
        admin = VaultAnchor(address=address, auth=VaultAuth(token=token))
        VaultPkiAnchor(VaultClient(admin)).check()
        bao_cli("policy", "write", "ca-daemon", str(POLICY))
        bao_cli("auth", "enable", "approle")
        bao_cli(
            "write",
            "auth/approle/role/ca-daemon",
            "token_policies=ca-daemon",
            "token_no_default_policy=true",
            "token_ttl=10m",
        )
        role_id = bao_cli(
            "read", "-field=role_id", "auth/approle/role/ca-daemon/role-id"
        ).stdout.strip()
        secret_id = bao_cli(
            "write", "-f", "-field=secret_id", "auth/approle/role/ca-daemon/secret-id"
        ).stdout.strip()
        secret_file = workdir / "secret-id"
        secret_file.write_text(secret_id + "\n")
        secret_file.chmod(0o600)
        yield PolicyVault(address, token, role_id, secret_file)


def test_the_vault_policy_carries_a_whole_rotation(
    policy_vault: PolicyVault, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    config = rotation_config(
        tmp_path,
        {
            "address": policy_vault.address,
            "create_if_missing": False,
            "auth": {
                "method": "approle",
                "role_id": policy_vault.role_id,
                "secret_id_file": str(policy_vault.secret_id_file),
            },
        },
    )
    settings = load_settings(config)
    out = settings.publish_directory
    clock = Clock(wall_clock())

    def linkerd_view() -> LinkerdView:
        files = (out / "linkerd" / n for n in ("ca.crt", "tls.crt", "tls.key"))
        return LinkerdView(*(f.read_bytes() for f in files))

    checked = CheckedPublisher(
        DirectoryPublisher(out),
        clock,
        InvariantChecker(settings.rotation.propagation_delay, VAULT_BACKDATE),
        lambda: read_directory(out),
        linkerd_view,
        linkerd_check,
    )
    anchor, journal = build_anchor_and_journal(settings)
    engine = Engine(settings, anchor, journal, [checked], clock=clock)
    admin = VaultAdmin(policy_vault.address, policy_vault.admin_token)

    def run() -> Phase:
        result = engine.reconcile()
        assert result.ok, (clock.now, result.errors)  # a refused path would show here
        assert result.state is not None
        return result.state.ca.phase

    assert run() is Phase.STEADY
    first = journal.load().state.ca
    assert first.active_root is not None and first.active_intermediate is not None
    old_root, old_inter = first.active_root.ref, first.active_intermediate.ref
    # A Kong client revoked under the policy (revoke, every CA's CRL read); the rotation
    # then rebuilds the CRLs for the CAs that join and leave the bundle (crl/rotate).
    revoking = engine.request_rotation("kong/payments", "policy drill: leaked", revoke=True)
    for _ in range(3):
        run()
    revoked = journal.load_ca()[0].operation(revoking)
    assert revoked is not None and revoked.state is OpState.SUCCEEDED, revoked
    operation = engine.request_rotation("trust-anchor", "policy drill")
    for _ in range(WALL_PASSES):
        follow_wall_clock(clock)
        if run() is not Phase.PROPAGATING:
            break
    ca = journal.load().state.ca
    assert ca.phase is Phase.RETIRING, ca.phase
    assert ca.active_root is not None and ca.active_intermediate is not None
    assert admin.default_issuer("pki-root") == ca.active_root.ref != old_root
    assert admin.default_issuer("pki-kong") == ca.active_intermediate.ref != old_inter
    for _ in range(20):
        clock.now += JUMP
        if run() is Phase.STEADY:
            break
    final = journal.load().state.ca
    op = final.operation(operation)
    assert op is not None and op.state is OpState.SUCCEEDED, op
    assert admin.issuer_names("pki-root") == sorted([old_root, ca.active_root.ref])
    assert final.crls is not None
    assert final.crls.issuers == (ca.active_intermediate.ref, ca.active_root.ref)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        # Keys are named, never re-pointed; issuers are read, never changed or removed.
        ("POST", "pki-root/config/keys", {"default": "root-1"}),
        ("POST", "pki-root/root/replace", {"default": "root-1"}),
        ("DELETE", "pki-root/issuer/root-1", None),
        ("POST", "pki-root/issuer/root-1", {"usage": "read-only"}),
        ("DELETE", "pki-kong/issuer/kong-2", None),
        # No private key leaves Vault, or comes into it: no exported generation, no key
        # read, no import.
        ("POST", "pki-root/root/rotate/exported", {"common_name": "x"}),
        ("POST", "pki-root/root/generate/exported", {"common_name": "x"}),
        ("POST", "pki-kong/intermediate/generate/exported", {"common_name": "x"}),
        ("GET", "pki-root/key/root-1", None),
        ("GET", "pki-kong/key/kong-2", None),
        ("POST", "pki-root/keys/import", {"pem_bundle": "x"}),
        ("POST", "pki-kong/issue/kong-client", {"common_name": "x"}),
        # Revocation: Kong clients only, never a CA on the root mount, never by key, no tidy.
        ("POST", "pki-root/revoke", {"serial_number": "01"}),
        ("POST", "pki-kong/revoke-with-key", {"serial_number": "01", "private_key": "x"}),
        ("POST", "pki-kong/tidy", {"tidy_revoked_certs": True}),
        ("POST", "pki-kong/config/crl", {"disable": True}),
        # Default issuers only on the daemon's own two mounts.
        ("POST", "pki-other/config/issuers", {"default": "x"}),
        # The journal: its own records only, never the CA record's history.
        ("DELETE", "secret/metadata/ca-daemon/other", None),
        ("DELETE", "secret/metadata/ca-daemon/state", None),
        ("POST", "secret/destroy/ca-daemon/state", {"versions": [1]}),
        ("POST", "secret/data/ca-daemon/other", {"data": {"x": "y"}}),
    ],
)
def test_the_vault_policy_refuses_the_rest(
    policy_vault: PolicyVault, method: str, path: str, body: object
) -> None:
    client = policy_vault.login()
    with pytest.raises(hvac.exceptions.Forbidden):
        client.adapter.request(method, f"/v1/{path}", json=body)
