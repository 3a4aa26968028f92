"""The embedded-default anchor: CA keys encrypted at rest in a local directory.

Layout under ``anchor.local.dir``::

    anchor/<ref>.crt     the CA certificate
    anchor/<ref>.key     its key, PKCS#8 encrypted with the passphrase, mode 0600
    passphrase           generated on first use unless passphrase_file points elsewhere
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import tempfile
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca_daemon.anchor.base import CA
from ca_daemon.errors import AnchorError
from ca_daemon.pki.bundle import certificate_pem
from ca_daemon.pki.crl import sign_crl
from ca_daemon.pki.keys import (
    KeyMaterialError,
    KeyType,
    PrivateKey,
    PublicKey,
    generate_key,
    key_matches_certificate,
    load_private_key,
    private_key_pem,
)
from ca_daemon.pki.profiles import Kind, Subject, Validity, sign_certificate
from ca_daemon.util.files import ensure_private_dir, write_atomic

_REF = re.compile(r"^[a-z0-9][-a-z0-9]*$")
# The ref of the active root, noted at each activation (as Vault's default issuer).
DEFAULT_ROOT = "default-root"
log = logging.getLogger(__name__)


class NoState(AnchorError):
    """Nothing was created yet: a read-only command has nothing to read."""


def read_passphrase(path: Path, data_dir: Path | None = None) -> bytes:
    """The existing passphrase; NoState when there is none yet. Never writes."""
    try:
        value = path.read_bytes().strip()
    except FileNotFoundError:
        if data_dir is not None and _sealed_state(data_dir):
            raise AnchorError(_lost_passphrase(path, data_dir)) from None
        raise NoState(f"no passphrase at {path}: nothing was created yet") from None
    except OSError as exc:
        raise AnchorError(f"passphrase file {path}: unreadable ({exc.strerror})") from None
    if not value:
        raise AnchorError(f"passphrase file {path} is empty")
    return value


def load_or_create_passphrase(path: Path, data_dir: Path | None = None) -> bytes:
    """The passphrase protecting keys at rest; generated (0600) the first time.

    Two processes starting at once on a fresh directory must end with one passphrase:
    the new one is written in full to a temporary file, then linked into place, which
    fails when another process got there first; that one's passphrase is then used.
    Never generated anew for a ``data_dir`` that already holds keys or a journal sealed
    with the lost one: they would all be unreadable, and "recovering" by deleting them
    would take the published credentials down.
    """
    try:
        return read_passphrase(path, data_dir)
    except NoState:
        pass
    ensure_private_dir(path.parent)
    value = secrets.token_urlsafe(32).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(value + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # like O_EXCL: never replaces an existing passphrase
        except FileExistsError:
            return read_passphrase(path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return value


def _lost_passphrase(path: Path, data_dir: Path) -> str:
    return (
        f"passphrase file {path} is missing, but {data_dir} holds keys and a journal sealed "
        "with it: restore the file from a backup (a new passphrase cannot open them); "
        "nothing was changed"
    )


def _sealed_state(data_dir: Path) -> bool:
    anchor = data_dir / "anchor"
    return (
        any(anchor.glob("*.key"))
        or (data_dir / "state.json").exists()
        or (data_dir / "state.d").exists()
    )


# --- secret files and their modes ------------------------------------------------------------

SECRET_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def secret_paths(directory: Path, extra: Iterable[Path] = ()) -> tuple[list[Path], list[Path]]:
    """(secret files, private directories) of a local data directory that exist.

    Files: ``anchor/*.key``, ``state.json``, ``state.d/**/*.json``, the passphrase and
    the API token (``extra``). Directories: ``anchor/`` and ``state.d/`` with its folders.
    """
    anchor, journal = directory / "anchor", directory / "state.d"
    files = [*sorted(anchor.glob("*.key")), directory / "state.json"]
    files += sorted(journal.rglob("*.json"))
    files += [directory / "passphrase", *extra]
    dirs = [anchor, journal, *sorted(p for p in journal.rglob("*") if p.is_dir())]
    unique = list(dict.fromkeys(p for p in files if p.is_file()))
    return unique, [d for d in dirs if d.is_dir() and not d.is_symlink()]


def loose_secrets(directory: Path, extra: Iterable[Path] = ()) -> list[str]:
    """A sentence for each secret file or private directory other users can read."""
    files, dirs = secret_paths(directory, extra)
    problems = []
    for path, want, what in [
        *((f, SECRET_MODE, "secret file") for f in files),
        *((d, PRIVATE_DIR_MODE, "private directory") for d in dirs),
    ]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            problems.append(
                f"{path}: {what} is open to other users (mode {mode:04o}, must be {want:04o})"
            )
    return problems


def repair_secret_modes(directory: Path, extra: Iterable[Path] = ()) -> list[str]:
    """Take group and other access away from every secret; what was repaired.

    Raises AnchorError when a secret open to others cannot be repaired (another owner,
    a read-only filesystem): it is not used then.
    """
    files, dirs = secret_paths(directory, extra)
    repaired = []
    for path, want in [*((f, SECRET_MODE) for f in files), *((d, PRIVATE_DIR_MODE) for d in dirs)]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if not mode & 0o077:
            continue
        try:
            os.chmod(path, mode & ~0o077)
        except OSError as exc:
            owner, me = path.stat().st_uid, os.geteuid()
            fix = f"chmod {want:04o} {path}"
            if owner != me:
                fix = f"give it to this daemon's user: chown {me} {path}; {fix}"
            raise AnchorError(
                f"{path} is open to other users (mode {mode:04o}, owned by uid {owner}; this "
                f"daemon runs as uid {me}) and cannot be repaired ({exc.strerror}): "
                f"refusing to use it; {fix}"
            ) from None
        repaired.append(
            f"{path}: was mode {mode:04o}, open to other users; now {mode & ~0o077:04o}"
        )
    return repaired


class LocalAnchor:
    def __init__(
        self, directory: Path, passphrase: bytes, secret_files: Sequence[Path] = ()
    ) -> None:
        self._data = directory
        self._dir = directory / "anchor"
        self._secrets = tuple(secret_files)  # files outside ``anchor/`` kept at 0600 too
        self._passphrase = passphrase
        self.description = f"local anchor in {directory}"
        # Decrypting a CA key derives a key from the passphrase: once per CA, not per
        # signature, or renewing thousands of clients would spend its time there.
        self._keys: dict[str, PrivateKey] = {}
        self._lock = threading.Lock()

    def check(self) -> None:
        try:
            ensure_private_dir(self._dir)
        except OSError as exc:
            raise AnchorError(f"{self.description}: cannot use directory: {exc.strerror}") from exc
        for repaired in repair_secret_modes(self._data, self._secrets):
            log.warning("repaired the mode of a secret: %s", repaired)

    def _paths(self, ref: str) -> tuple[Path, Path]:
        if not _REF.match(ref):
            raise AnchorError(f"invalid CA name {ref!r}")
        return self._dir / f"{ref}.crt", self._dir / f"{ref}.key"

    def _load(self, ref: str) -> tuple[CA, PrivateKey] | None:
        cert_path, key_path = self._paths(ref)
        if not (cert_path.exists() and key_path.exists()):
            return None
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        try:
            key = load_private_key(key_path.read_bytes(), self._passphrase)
        except KeyMaterialError as exc:
            raise AnchorError(f"{self.description}: CA {ref}: {exc}") from None
        if not key_matches_certificate(key, cert):
            # Signing with it would publish certificates no verifier can chain.
            raise AnchorError(
                f"{self.description}: CA {ref}: the key in {key_path} is not the key of "
                f"{cert_path}; restore both from a backup"
            )
        return CA(ref, cert), key

    def _signer(self, ca: CA) -> PrivateKey:
        with self._lock:
            key = self._keys.get(ca.ref)
        if key is None:
            loaded = self._load(ca.ref)
            if loaded is None:
                raise AnchorError(f"{self.description}: CA {ca.ref} is missing")
            if loaded[0].cert != ca.cert:
                raise AnchorError(f"{self.description}: CA {ca.ref} on disk is another certificate")
            key = loaded[1]
            with self._lock:
                self._keys[ca.ref] = key
        return key

    def existing_cas(self) -> list[CA]:
        """Every CA under ``anchor/`` with both its certificate and its key."""
        found = []
        for cert_path in sorted(self._dir.glob("*.crt")):
            ref = cert_path.stem
            if not _REF.match(ref) or not cert_path.with_suffix(".key").exists():
                continue
            try:
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            except (OSError, ValueError) as exc:
                raise AnchorError(
                    f"{self.description}: CA certificate {cert_path} is unreadable "
                    f"({type(exc).__name__})"
                ) from None
            found.append(CA(ref, cert, default=ref == self._default_root()))
        return found

    def _default_root(self) -> str | None:
        try:
            text = (self._dir / DEFAULT_ROOT).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if _REF.match(text) else None

    def set_default(self, root: CA, intermediate: CA | None) -> None:
        """Nothing else signs with the local anchor; the active root is noted all the same,
        so a journal rebuilt after a loss knows which root was active."""
        ensure_private_dir(self._dir)
        write_atomic(self._dir / DEFAULT_ROOT, f"{root.ref}\n".encode(), mode=0o644)

    def _store(self, ref: str, cert: x509.Certificate, key_pem: bytes) -> CA:
        cert_path, key_path = self._paths(ref)
        ensure_private_dir(self._dir)
        write_atomic(key_path, key_pem, mode=0o600)
        write_atomic(cert_path, certificate_pem(cert).encode(), mode=0o644)
        return CA(ref, cert)

    def create_root(self, ref: str, subject: Subject, key_type: KeyType, validity: Validity) -> CA:
        existing = self._load(ref)
        if existing is not None:
            return existing[0]
        key = generate_key(key_type)
        cert = sign_certificate(Kind.TRUST_ANCHOR, subject, key.public_key(), key, None, validity)
        return self._store(ref, cert, private_key_pem(key, self._passphrase))

    def create_intermediate(self, ref: str, root: CA, subject: Subject, validity: Validity) -> CA:
        existing = self._load(ref)
        if existing is not None:
            return existing[0]
        key = generate_key("ec-p256")
        cert = sign_certificate(
            Kind.KONG_INTERMEDIATE,
            subject,
            key.public_key(),
            self._signer(root),
            root.cert,
            validity,
        )
        return self._store(ref, cert, private_key_pem(key, self._passphrase))

    def sign_ca(
        self, root: CA, csr: x509.CertificateSigningRequest, subject: Subject, validity: Validity
    ) -> x509.Certificate:
        return sign_certificate(
            Kind.LINKERD_ISSUER, subject, _csr_key(csr), self._signer(root), root.cert, validity
        )

    def sign_client(
        self,
        intermediate: CA,
        csr: x509.CertificateSigningRequest,
        subject: Subject,
        validity: Validity,
    ) -> x509.Certificate:
        signer = self._signer(intermediate)
        return sign_certificate(
            Kind.KONG_CLIENT, subject, _csr_key(csr), signer, intermediate.cert, validity
        )

    # --- revocation: each CA's revoked serials in anchor/<ref>.revoked, its CRL signed here ---

    def _revoked_path(self, ref: str) -> Path:
        return self._paths(ref)[0].with_suffix(".revoked")

    def _revoked(self, ref: str) -> list[tuple[int, datetime]]:
        try:
            lines = self._revoked_path(ref).read_text(encoding="ascii").split()
        except FileNotFoundError:
            return []
        pairs = (line.split(",", 1) for line in lines)
        return [(int(serial, 16), datetime.fromisoformat(at)) for serial, at in pairs]

    def revoke(self, cert: x509.Certificate, issuer: CA) -> None:
        with self._lock:
            known = self._revoked(issuer.ref)
            if any(serial == cert.serial_number for serial, _ in known):
                return
            known.append((cert.serial_number, cert_time_now()))
            text = "".join(f"{serial:x},{at.isoformat()}\n" for serial, at in known)
            ensure_private_dir(self._dir)
            write_atomic(self._revoked_path(issuer.ref), text.encode(), mode=0o644)

    def crls(
        self, cas: Sequence[CA], now: datetime, rebuild: bool
    ) -> list[x509.CertificateRevocationList]:
        # Made anew on every call: nothing is kept but the serials.
        return [sign_crl(ca.cert, self._signer(ca), self._revoked(ca.ref), now) for ca in cas]


def cert_time_now() -> datetime:
    """Now, to the second, as X.509 times have it."""
    return datetime.now(UTC).replace(microsecond=0)


def _csr_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    if not csr.is_signature_valid:
        raise AnchorError("CSR signature is invalid")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise AnchorError(f"unsupported CSR key type {type(key).__name__}")
    return key
