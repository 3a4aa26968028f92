"""Check what is published the way Linkerd and Kong (and an upstream behind Kong) would.

Pure checks over PEM bytes; ``verify_directory`` only reads files. Each problem is a
finding (ca_daemon/report/findings.py): a stable id, and a sentence naming the file and
what is wrong, never quoting key material.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from ca_daemon.anchor.local import NoState, loose_secrets
from ca_daemon.config.settings import Settings
from ca_daemon.model.state import State
from ca_daemon.model.world import desired_world
from ca_daemon.pki.bundle import (
    BundleError,
    fingerprint,
    stable_id,
)
from ca_daemon.pki.bundle import parse_pem_certificates_strict as parse_pem_certificates
from ca_daemon.pki.chain import verify_ca_under_roots, verify_client_chain
from ca_daemon.pki.keys import KeyMaterialError, key_matches_certificate, load_private_key
from ca_daemon.pki.profiles import Kind, check_profile
from ca_daemon.report.findings import Report


@dataclass(frozen=True)
class Thresholds:
    """rotate_before per certificate, to tell a renewal that is failing."""

    issuer: timedelta | None = None
    clients: Mapping[str, timedelta] = field(default_factory=dict)
    intermediate: timedelta | None = None
    root: timedelta | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(
            issuer=settings.linkerd.issuer.rotate_before,
            clients={c.name: c.rotate_before for c in settings.kong.clients},
            intermediate=settings.kong.intermediate.rotate_before,
            root=settings.root.rotate_before,
        )


@dataclass(frozen=True)
class Expected:
    """What the configuration and the journal say must be published.

    ``roots`` None: the journal is not known, only the configuration is checked.
    """

    linkerd: bool = True
    kong: bool = True
    clients: frozenset[str] = frozenset()
    roots: tuple[x509.Certificate, ...] | None = None
    issuer: x509.Certificate | None = None
    client_certs: Mapping[str, x509.Certificate] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, state: State | None = None) -> Expected:
        linkerd, kong = settings.linkerd.enabled, settings.kong.enabled
        clients = frozenset(c.name for c in settings.kong.clients) if kong else frozenset()
        if state is None:
            return cls(linkerd, kong, clients)
        world = desired_world(state, settings)
        return cls(
            linkerd,
            kong,
            clients,
            roots=world.roots,
            issuer=world.linkerd_issuer.cert if world.linkerd_issuer else None,
            client_certs={n: e.cert for n, e in world.kong_clients.items()},
        )


def check_bundle(
    what: str,
    pem: bytes,
    now: datetime,
    report: Report,
    rotate_before: timedelta | None = None,
) -> list[x509.Certificate]:
    try:
        roots = parse_pem_certificates(pem, what=what)
    except BundleError as exc:
        report.add("bundle-unreadable", what, str(exc))
        return []
    for root in roots:
        label = f"{what}: root {fingerprint(root)[:16]}"
        for p in check_profile(Kind.TRUST_ANCHOR, root).problems:
            report.add("root-invalid", label, f"{label} {p}")
        if root.not_valid_after_utc < now:
            expired = f"expired at {root.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
            report.add("root-expired", label, f"{label} {expired}")
    _check_roots_time_left(what, roots, rotate_before, now, report)
    report.checked.append(f"{what}: {len(roots)} root(s)")
    return roots


def _check_roots_time_left(
    what: str,
    roots: list[x509.Certificate],
    rotate_before: timedelta | None,
    now: datetime,
    report: Report,
) -> None:
    """The root rotation is failing when even the bundle's youngest root is low. Only the
    youngest: while a rotation retires the old root, that one is meant to run low."""
    live = [r for r in roots if r.not_valid_after_utc >= now]
    if not live:
        return  # expiry itself is reported above
    youngest = max(live, key=lambda r: r.not_valid_after_utc)
    where = f"{what}: root {fingerprint(youngest)[:16]}"
    check_time_left(where, youngest, rotate_before, now, report)


def _key_matches(what: str, cert: x509.Certificate, key_pem: bytes, report: Report) -> None:
    try:
        key = load_private_key(key_pem)
    except KeyMaterialError as exc:
        report.add("key-unreadable", what, f"{what}: {exc}")
        return
    if not key_matches_certificate(key, cert):
        report.add("key-mismatch", what, f"{what}: private key does not match the certificate")


def check_time_left(
    where: str,
    cert: x509.Certificate,
    rotate_before: timedelta | None,
    now: datetime,
    report: Report,
) -> None:
    """Renewal is failing when less than half of ``rotate_before`` is left."""
    if rotate_before is None or cert.not_valid_after_utc < now:
        return  # expiry itself is reported by the chain checks
    left = cert.not_valid_after_utc - now
    if left < rotate_before / 2:
        report.add(
            "renewal-overdue",
            where,
            f"{where}: only {int(left.total_seconds() // 3600)}h left, renewal is due at "
            f"{int(rotate_before.total_seconds() // 3600)}h: renewal is failing",
        )


def check_linkerd_issuer(
    crt_pem: bytes,
    key_pem: bytes,
    roots: list[x509.Certificate],
    now: datetime,
    report: Report,
    where: str = "linkerd issuer",
    rotate_before: timedelta | None = None,
) -> x509.Certificate | None:
    """Linkerd's rules: one ECDSA P-256 CA certificate, key matching, chaining to the anchors."""
    try:
        certs = parse_pem_certificates(crt_pem, what=f"{where} certificate")
    except BundleError as exc:
        report.add("issuer-invalid", where, str(exc))
        return None
    issuer = certs[0]
    if len(certs) > 1:
        report.add(
            "issuer-invalid", where, f"{where}: tls.crt must hold the issuer certificate only"
        )
    for p in check_profile(Kind.LINKERD_ISSUER, issuer).problems:
        report.add("issuer-invalid", where, f"{where}: {p}")
    for p in verify_ca_under_roots(issuer, roots, now):
        report.add("issuer-untrusted", where, f"{where}: {p}")
    _key_matches(where, issuer, key_pem, report)
    check_time_left(where, issuer, rotate_before, now, report)
    report.checked.append(f"{where}: {fingerprint(issuer)[:16]} until {issuer.not_valid_after_utc}")
    return issuer


def check_kong_client(
    name: str,
    crt_pem: bytes,
    key_pem: bytes,
    roots: list[x509.Certificate],
    now: datetime,
    report: Report,
    rotate_before: timedelta | None = None,
    intermediate_rotate_before: timedelta | None = None,
) -> None:
    where = f"kong client {name}"
    try:
        chain = parse_pem_certificates(crt_pem, what=f"{where} tls.crt")
    except BundleError as exc:
        report.add("client-invalid", where, str(exc))
        return
    leaf, intermediates = chain[0], chain[1:]
    if not intermediates:
        report.add("client-invalid", where, f"{where}: tls.crt has no intermediate after the leaf")
    for p in check_profile(Kind.KONG_CLIENT, leaf).problems:
        report.add("client-invalid", where, f"{where}: {p}")
    for inter in intermediates:
        for p in check_profile(Kind.KONG_INTERMEDIATE, inter).problems:
            report.add("client-invalid", where, f"{where}: intermediate {p}")
        # Named by itself, so that the clients sharing it report it once.
        label = f"kong intermediate {fingerprint(inter)[:16]}"
        check_time_left(label, inter, intermediate_rotate_before, now, report)
    for p in verify_client_chain(leaf, intermediates, roots, now):
        report.add("client-untrusted", where, f"{where}: {p}")
    _key_matches(where, leaf, key_pem, report)
    check_time_left(where, leaf, rotate_before, now, report)
    report.checked.append(f"{where}: {fingerprint(leaf)[:16]} until {leaf.not_valid_after_utc}")


def check_kong_cas(cas: Mapping[str, bytes], roots: list[x509.Certificate], report: Report) -> None:
    """Kong CA certificates: one CA per entity, id stable, the same set as the bundle."""
    seen: dict[str, str] = {}  # fingerprint -> where
    for ident, pem in sorted(cas.items()):
        where = f"kong CA {ident}"
        try:
            certs = parse_pem_certificates(pem, what=where)
        except BundleError as exc:
            report.add("kong-ca-invalid", where, str(exc))
            continue
        if len(certs) != 1:
            report.add(
                "kong-ca-invalid",
                where,
                f"{where}: holds {len(certs)} certificates; Kong takes one",
            )
        cert = certs[0]
        if stable_id(cert) != ident:
            report.add(
                "kong-ca-invalid",
                where,
                f"{where}: id is not the certificate's stable id {stable_id(cert)}",
            )
        seen[fingerprint(cert)] = where
    want = {fingerprint(r) for r in roots}
    for missing in sorted(want - set(seen)):
        report.add(
            "kong-ca-missing",
            f"trust bundle root {missing[:16]}",
            f"kong CA for bundle root {missing[:16]} is missing",
        )
    for extra in sorted(set(seen) - want):
        report.add(
            "kong-ca-extra", seen[extra], f"kong CA {extra[:16]} is not a root of the trust bundle"
        )


def _read(path: Path, report: Report) -> bytes | None:
    # Non-blocking, and only a regular file: a FIFO put in a file's place must be named,
    # not waited on forever.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        report.add("file-missing", str(path), f"{path}: missing")
        return None
    except OSError as exc:
        report.add("file-unreadable", str(path), f"{path}: unreadable ({exc.strerror})")
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            report.add("file-unreadable", str(path), f"{path}: not a regular file")
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as exc:
        report.add("file-unreadable", str(path), f"{path}: unreadable ({exc.strerror})")
        return None
    finally:
        os.close(fd)


def _private(path: Path, report: Report) -> None:
    if path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077:
        report.add(
            "secret-mode", str(path), f"{path}: key file is readable by others (mode must be 0600)"
        )


def _against_journal(
    what: str,
    published: list[x509.Certificate],
    journal: tuple[x509.Certificate, ...],
    report: Report,
) -> None:
    known = {fingerprint(r) for r in journal}
    seen = {fingerprint(r) for r in published}
    for extra in sorted(seen - known):
        report.add(
            "journal-mismatch",
            what,
            f"{what}: root {extra[:16]} is not a root the journal knows (a planted trust anchor?)",
        )
    for missing in sorted(known - seen):
        report.add(
            "journal-mismatch", what, f"{what}: the journal's root {missing[:16]} is missing"
        )


def _same_as_journal(
    where: str, published: bytes, journal: x509.Certificate | None, report: Report
) -> None:
    if journal is None:
        report.add(
            "journal-mismatch",
            where,
            f"{where}: published, but the journal holds no such certificate",
        )
        return
    try:
        cert = parse_pem_certificates(published, what=where)[0]
    except BundleError:
        return  # reported by the checks of its own
    if fingerprint(cert) != fingerprint(journal):
        report.add(
            "journal-mismatch",
            where,
            f"{where}: published certificate {fingerprint(cert)[:16]} is not the journal's "
            f"{fingerprint(journal)[:16]}",
        )


def verify_directory(
    root: Path,
    now: datetime,
    thresholds: Thresholds = Thresholds(),
    expected: Expected | None = None,
) -> Report:
    """Check a published directory (the SPEC layout) as Linkerd and Kong would read it.

    With ``expected``, also that it holds what the configuration enables (every
    configured client) and what the journal holds (no root, issuer or client it does
    not know).
    """
    report = Report()
    bundle = _read(root / "trust-bundle.pem", report)
    if bundle is None:
        return report
    roots = check_bundle("trust-bundle.pem", bundle, now, report, thresholds.root)
    journal_roots = expected.roots if expected is not None else None
    if journal_roots is not None and roots:  # an unreadable bundle is reported already
        _against_journal("trust-bundle.pem", roots, journal_roots, report)

    linkerd = root / "linkerd"
    if linkerd.is_dir():
        ca = _read(linkerd / "ca.crt", report)
        if ca is not None and ca != bundle:
            report.add(
                "issuer-ca-mismatch",
                str(linkerd / "ca.crt"),
                "linkerd/ca.crt differs from trust-bundle.pem",
            )
        crt, key = _read(linkerd / "tls.crt", report), _read(linkerd / "tls.key", report)
        _private(linkerd / "tls.key", report)
        if crt is not None and key is not None:
            check_linkerd_issuer(crt, key, roots, now, report, rotate_before=thresholds.issuer)
        if crt is not None and expected is not None and journal_roots is not None:
            _same_as_journal("linkerd issuer", crt, expected.issuer, report)
    elif expected is not None and expected.linkerd:
        report.add("file-missing", str(linkerd), f"{linkerd}: missing, but linkerd is enabled")

    kong = root / "kong"
    if kong.is_dir():
        cas = {
            p.stem: data
            for p in sorted((kong / "ca").glob("*.pem"))
            if (data := _read(p, report)) is not None
        }
        check_kong_cas(cas, roots, report)
        clients = kong / "clients"
        published = set()
        for client_dir in sorted(clients.iterdir() if clients.is_dir() else []):
            name = client_dir.name
            published.add(name)
            ca = _read(client_dir / "ca.crt", report)
            if ca is not None and ca != bundle:
                report.add(
                    "bundle-copy-differs",
                    str(client_dir / "ca.crt"),
                    f"kong client {name}: ca.crt differs from trust-bundle.pem",
                )
            crt, key = _read(client_dir / "tls.crt", report), _read(client_dir / "tls.key", report)
            _private(client_dir / "tls.key", report)
            if crt is not None and key is not None:
                check_kong_client(
                    name,
                    crt,
                    key,
                    roots,
                    now,
                    report,
                    thresholds.clients.get(name),
                    thresholds.intermediate,
                )
            if expected is None:
                continue
            if name not in expected.clients:
                report.add(
                    "client-not-configured",
                    str(client_dir),
                    f"kong client {name}: published, but not configured",
                )
            elif crt is not None and journal_roots is not None:
                _same_as_journal(
                    f"kong client {name}", crt, expected.client_certs.get(name), report
                )
        for name in sorted(expected.clients - published if expected is not None else ()):
            report.add(
                "client-missing",
                str(clients / name),
                f"kong client {name}: {clients / name} is missing, but it is configured",
            )
    elif expected is not None and expected.kong:
        report.add("file-missing", str(kong), f"{kong}: missing, but kong is enabled")
    return report


def verify_published(settings: Settings, where: Path, now: datetime) -> Report:
    """``ca-daemon verify`` on a directory: the files as Linkerd and Kong read them, against
    the configuration and the journal (loaded read-only), and the modes of the secrets."""
    # local import: start-up time, the Vault client (hvac) only when a directory is checked
    from ca_daemon.journal.open import build_anchor_and_journal

    journal_report = Report()
    state: State | None = None
    try:
        _, journal = build_anchor_and_journal(settings, create=False)
        state = journal.load().state
    except NoState as exc:
        message = f"no journal to check the published files against: {exc}"
        journal_report.add("journal-unavailable", "journal", message)
    except Exception as exc:  # reported, not raised: the published files are checked still
        journal_report.add("journal-unavailable", "journal", f"cannot read the journal: {exc}")
    if state is not None and state.ca.active_root is None:
        journal_report.add(
            "journal-unavailable", "journal", "the journal holds no trust anchor yet"
        )
        state = None
    expected = Expected.from_settings(settings, state)
    report = verify_directory(where, now, Thresholds.from_settings(settings), expected)
    report.findings[:0] = journal_report.findings
    if settings.anchor.backend == "local":
        local = settings.anchor.local
        extra = (local.effective_passphrase_file, settings.api_token_file)
        for problem in loose_secrets(local.dir, extra):
            report.add("secret-mode", problem.partition(": ")[0], problem)
    return report
