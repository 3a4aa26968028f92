"""The SPEC's three root-rotation invariants, checked on what is *published*.

1. Every published certificate chains to a root in every published bundle.
2. A root leaves a bundle only after nothing that chains to it can still be valid; when
   it retires on proof (an emergency), only after nothing published chains to it, which
   1. checks (and the caller checks what is presented, e.g. by meshed Pods).
3. Nothing is signed by a root before that root has been in every bundle for the
   propagation delay.

``InvariantChecker.observe`` is called after every publish with a ``Published``
snapshot read back from the target (files, or the live cluster), never from the
daemon's own memory, and raises AssertionError naming every violation.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.pki.chain import directly_issued_by, verify_ca_under_roots, verify_client_chain


@dataclass(frozen=True)
class Published:
    """Everything a verifier can see: each bundle by where it is, the Linkerd issuer, and
    each Kong client chain (leaf first)."""

    bundles: Mapping[str, tuple[x509.Certificate, ...]]
    issuer: x509.Certificate | None = None
    clients: Mapping[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)


def _certs(pem: bytes | str, what: str) -> tuple[x509.Certificate, ...]:
    return tuple(parse_pem_certificates(pem, what=what))


def read_directory(out: Path) -> Published:
    """The embedded default's published files, read through their documented paths."""
    bundles = {"trust-bundle.pem": _certs((out / "trust-bundle.pem").read_bytes(), "bundle")}
    issuer = None
    if (out / "linkerd" / "tls.crt").exists():
        bundles["linkerd/ca.crt"] = _certs((out / "linkerd" / "ca.crt").read_bytes(), "ca.crt")
        issuer = _certs((out / "linkerd" / "tls.crt").read_bytes(), "issuer")[0]
    cas = tuple(
        _certs(p.read_bytes(), p.name)[0] for p in sorted((out / "kong" / "ca").glob("*.pem"))
    )
    bundles["kong/ca"] = cas
    clients = {}
    client_dirs = out / "kong" / "clients"  # absent while no client was ever issued
    for client_dir in sorted(client_dirs.iterdir() if client_dirs.is_dir() else ()):
        clients[client_dir.name] = _certs((client_dir / "tls.crt").read_bytes(), "client")
        bundles[f"kong/clients/{client_dir.name}/ca.crt"] = _certs(
            (client_dir / "ca.crt").read_bytes(), "client ca.crt"
        )
    return Published(bundles=bundles, issuer=issuer, clients=clients)


def _b64(obj: Mapping[str, Any], key: str) -> bytes:
    return base64.b64decode(obj["data"][key])


def read_cluster(
    get: Any,
    linkerd_ns: str,
    kong_ns: str,
    clients: Mapping[str, tuple[str, str]],
) -> Published:
    """The Kubernetes objects as Linkerd and the Kong Ingress Controller read them.

    ``get(path)`` returns the parsed JSON of an API path (or None when absent);
    ``clients`` maps a client name to (namespace, Secret name).
    """
    trust = get(f"/api/v1/namespaces/{linkerd_ns}/configmaps/linkerd-identity-trust-roots")
    issuer_secret = get(f"/api/v1/namespaces/{linkerd_ns}/secrets/linkerd-identity-issuer")
    bundles = {
        "configmap linkerd-identity-trust-roots": _certs(trust["data"]["ca-bundle.crt"], "cm")
    }
    issuer = None
    if issuer_secret is not None:
        bundles["secret linkerd-identity-issuer ca.crt"] = _certs(
            _b64(issuer_secret, "ca.crt"), "issuer ca.crt"
        )
        issuer = _certs(_b64(issuer_secret, "tls.crt"), "issuer")[0]
    listed = get(f"/api/v1/namespaces/{kong_ns}/secrets?labelSelector=konghq.com%2Fca-cert%3Dtrue")
    bundles["kong CA secrets"] = tuple(
        _certs(_b64(s, "cert"), s["metadata"]["name"])[0] for s in listed["items"]
    )
    chains = {}
    for name, (namespace, secret) in clients.items():
        obj = get(f"/api/v1/namespaces/{namespace}/secrets/{secret}")
        if obj is not None:
            chains[name] = _certs(_b64(obj, "tls.crt"), f"client {name}")
    return Published(bundles=bundles, issuer=issuer, clients=chains)


def _issuing_root(cert: x509.Certificate, roots: Mapping[str, x509.Certificate]) -> str | None:
    return next((fp for fp, root in roots.items() if directly_issued_by(cert, root)), None)


class InvariantChecker:
    def __init__(self, propagation_delay: timedelta, clock_skew: timedelta) -> None:
        self.propagation_delay = propagation_delay
        self.clock_skew = clock_skew
        self.roots: dict[str, x509.Certificate] = {}  # every root ever seen, by fingerprint
        self.in_every_bundle_since: dict[str, datetime] = {}
        self.bootstrap: set[str] = set()  # roots already trusted at the first observation
        # Latest not-after of everything ever published under each root.
        self.valid_until: dict[str, datetime] = {}
        self.observations = 0
        self.certificates_seen: set[str] = set()

    def observe(
        self,
        now: datetime,
        published: Published,
        since: datetime | None = None,
        on_proof: bool = False,
    ) -> None:
        """``since``: the last moment the snapshot before this one was read. A root seen in
        every bundle for the first time became so after then; a caller whose snapshots
        can be seconds apart (a server it reads was down) says so, and the root is dated
        from then instead of from ``now``, which would be late. ``on_proof``: a root that
        leaves now retires on proof, while certificates it signed earlier are valid."""
        problems: list[str] = []
        bundles = {
            where: {fingerprint(r): r for r in roots} for where, roots in published.bundles.items()
        }
        for found in bundles.values():
            self.roots.update(found)
        everywhere = set.intersection(*(set(b) for b in bundles.values())) if bundles else set()

        # 2. a root that left a bundle: nothing under it may still be valid.
        for fp in set(self.in_every_bundle_since) - everywhere:
            until = self.valid_until.get(fp)
            if until is not None and until > now and not on_proof:
                problems.append(
                    f"root {fp[:12]} left a bundle at {now:%Y-%m-%d %H:%M} while a certificate "
                    f"under it is valid until {until:%Y-%m-%d %H:%M}"
                )
            del self.in_every_bundle_since[fp]
        for fp in everywhere:
            self.in_every_bundle_since.setdefault(fp, since or now)
        if self.observations == 0:
            self.bootstrap |= everywhere

        # 1. and 3., for the issuer and for every client chain.
        if published.issuer is not None:
            problems += self._signed(published.issuer, published.issuer, bundles, now, "issuer")
            for where, certs in published.bundles.items():
                for p in verify_ca_under_roots(published.issuer, list(certs), now):
                    problems.append(f"linkerd issuer against {where}: {p}")
        for name, chain in published.clients.items():
            leaf, intermediates = chain[0], chain[1:]
            for inter in intermediates:
                problems += self._signed(inter, leaf, bundles, now, f"client {name}")
            for where, certs in published.bundles.items():
                for p in verify_client_chain(leaf, intermediates, list(certs), now):
                    problems.append(f"kong client {name} against {where}: {p}")
        self.observations += 1
        assert not problems, "invariants broken:\n  " + "\n  ".join(problems)

    def _signed(
        self,
        ca: x509.Certificate,
        end: x509.Certificate,
        bundles: Mapping[str, Mapping[str, x509.Certificate]],
        now: datetime,
        what: str,
    ) -> list[str]:
        """Record ``ca`` (signed by a root; ``end`` is what is published under it) and check
        invariant 3 the first time it is seen."""
        root = _issuing_root(ca, self.roots)
        if root is None:
            return [f"{what}: signed by no root any bundle ever held"]
        end_until = min(end.not_valid_after_utc, ca.not_valid_after_utc)
        self.valid_until[root] = max(self.valid_until.get(root, end_until), end_until)
        key = fingerprint(ca)
        if key in self.certificates_seen or root in self.bootstrap:
            return []
        self.certificates_seen.add(key)
        since = self.in_every_bundle_since.get(root)
        # not-before is backdated by the clock skew: the signature was made skew later.
        signed_at = ca.not_valid_before_utc + self.clock_skew
        if since is None or signed_at < since + self.propagation_delay:
            return [
                f"{what}: {fingerprint(ca)[:12]} was signed by root {root[:12]} at "
                f"{signed_at:%Y-%m-%d %H:%M:%S}, before that root had been in every bundle "
                f"for {self.propagation_delay} (in every bundle since {since})"
            ]
        return []
