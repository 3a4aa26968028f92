"""One exception tree for the whole daemon, one branch per layer.

Code decides by type, never by an error's text; every message says what failed, where,
and what to do, and never carries key material. The leaves live next to the code that
raises them and derive from a branch here::

    CaDaemonError
    ├── ConfigError           bad configuration: exit 2 naming the field
    ├── PkiError              unusable certificate or key material (also a ValueError)
    ├── AnchorError           the CA's home (local files or Vault) refused or failed
    │   └── VaultError        Vault/OpenBao answered with an error, or not at all
    ├── StoreError            a journal record store (conflict, invalid record, I/O)
    ├── JournalError          the journal as a whole (conflict, corrupt, unavailable)
    ├── RotationError         carrying out a step (an unusable issuance, a request)
    │   └── RequestError      a manual rotation request that cannot be accepted as asked
    ├── KubeError             a Kubernetes API call failed
    ├── PublishError          a publisher's target refused or is unreachable
    ├── ServiceError          the running service (data dir owned elsewhere, journal down)
    └── ApiError              the CLI's view of the daemon's HTTP API
"""

from __future__ import annotations


class CaDaemonError(Exception):
    """Anything ca-daemon raises on purpose."""


class ConfigError(CaDaemonError):
    """The configuration is invalid; the message names the field."""


class PkiError(CaDaemonError, ValueError):
    """Certificate, bundle or key material that cannot be used."""


class AnchorError(CaDaemonError):
    """The anchor could not do what was asked (it is unreachable, refused, or broken)."""


class VaultError(AnchorError):
    """Vault or OpenBao answered with an error, or could not be reached."""


class StoreError(CaDaemonError):
    """A record store failed: a check-and-set conflict, an invalid record, or I/O."""


class JournalError(CaDaemonError):
    """The journal could not be read or written as asked."""


class JournalConflict(JournalError):
    """Someone else saved a newer record; reload and decide again."""


class JournalCorrupt(JournalError):
    """The store answered with something that is not a valid record."""


class JournalUnavailable(JournalError):
    """The store did not answer (down, sealed, refusing the token): nothing is known of
    the records, so nothing about them may be advised or done."""


class NewerJournal(JournalError):
    """A record written by a newer ca-daemon: this one must not touch it."""


class MigrationRefused(JournalCorrupt):
    """A record of an older layout cannot be moved: the move is not started."""


class RebuildRefused(JournalError):
    """A lost journal cannot be rebuilt safely from what the anchor holds."""


class RotationError(CaDaemonError):
    """A step of the rotation could not be carried out."""


class RequestError(RotationError):
    """A manual rotation request that cannot be accepted as asked."""


class KubeError(CaDaemonError):
    """A Kubernetes API call failed; the message names the call."""


class PublishError(CaDaemonError):
    """A publisher's target refused the trust world or could not be reached."""


class ServiceError(CaDaemonError):
    """The running service cannot do what was asked right now."""


class ApiError(CaDaemonError):
    """The daemon could not be reached, or refused; the message says which and why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # None: not reached at all

    @property
    def transient(self) -> bool:
        return self.status is None or self.status == 503
