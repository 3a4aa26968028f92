"""Publish the trust world as files, the embedded default's output.

The whole set is published at once, as the kubelet publishes a Secret volume: every
file lives in a version directory that ``out/..data`` points to, and the documented
paths (``out/trust-bundle.pem``, ``out/linkerd/tls.crt``, ...) are symlinks through it
(``out/linkerd -> ..data/linkerd``). A renewal swaps ``..data`` in one rename, so a
reader never sees a new certificate with the old key, nor an issuer with a bundle it
does not chain to: it sees the old set or the new set. A reader that must not mix two
sets either re-reads on the CREATE of ``..data`` (as Linkerd's identity controller
does) or checks that ``..data`` points to the same version before and after reading.

Keys are 0600, certificates 0644, directories 0755: a directory only reveals names,
and each key is unreadable to others by its own mode. Roots or clients no longer in
the world disappear because the new version does not have them.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from ca_daemon.model.generation import UNKNOWN, format_generation, generation_of, parse_generation
from ca_daemon.model.state import KONG_PREFIX, LINKERD_ISSUER
from ca_daemon.model.world import TrustWorld
from ca_daemon.pki.bundle import render_pem, stable_id
from ca_daemon.pki.crl import CRL_FILE
from ca_daemon.publish.base import PublishReport
from ca_daemon.util.files import (
    DATA,
    DIR_MODE,
    Content,
    SeenFiles,
    tree_unchanged,
    write_tree_atomic,
)

KEY_MODE = 0o600
CERT_MODE = 0o644
# The top-level entries this publisher owns (the SPEC layout), also in the flat layout
# an older ca-daemon wrote: one of them the world no longer needs is removed.
TOP_LEVEL = ("trust-bundle.pem", CRL_FILE, "linkerd", "kong")


def desired_files(world: TrustWorld) -> dict[str, tuple[Content, int]]:
    """Relative path → (content, mode) for everything the directory must hold; a key the
    journal keeps sealed is unsealed only if its file must be written."""
    bundle = world.bundle_pem.encode()
    files: dict[str, tuple[Content, int]] = {"trust-bundle.pem": (bundle, CERT_MODE)}
    if world.crls_pem is not None:
        files[CRL_FILE] = (world.crls_pem.encode(), CERT_MODE)
    if world.linkerd_issuer is not None:
        issuer = world.linkerd_issuer
        files["linkerd/ca.crt"] = (bundle, CERT_MODE)
        files["linkerd/tls.crt"] = (render_pem([issuer.cert]).encode(), CERT_MODE)
        files["linkerd/tls.key"] = (issuer.key, KEY_MODE)
    for root in world.roots:
        files[f"kong/ca/{stable_id(root)}.pem"] = (render_pem([root]).encode(), CERT_MODE)
    for name, client in world.kong_clients.items():
        chain = render_pem([client.cert, *client.chain]).encode()
        files[f"kong/clients/{name}/tls.crt"] = (chain, CERT_MODE)
        files[f"kong/clients/{name}/tls.key"] = (client.key, KEY_MODE)
        files[f"kong/clients/{name}/ca.crt"] = (bundle, CERT_MODE)
    return files


# The journal version of what is published, beside the versions: a publish from an older
# one (a process that read the journal before another saved and published) is refused.
GENERATION = "..generation"


class DirectoryPublisher:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"directory {root}"
        # Between passes: a file found as it was is not read again (15,000 files at
        # 5,000 clients; drift still shows, as a file edited or replaced moves), and the
        # world last found all in place, to tell the same one again without making files.
        self._seen = SeenFiles()
        self._in_place: TrustWorld | None = None

    def publish(self, world: TrustWorld) -> PublishReport:
        """Swap in a new version when anything differs; report the relative paths changed."""
        refused = self._refusal()
        if refused is not None:
            return PublishReport(target=self.description, errors={str(self.root): refused})
        ours = generation_of(world)
        if ours == UNKNOWN:  # not derived from a journal (tests, tools)
            return self._write(world)
        fd = os.open(self.root / GENERATION, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, CERT_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the check and the swap, one process at a time
            published = parse_generation(os.pread(fd, 64, 0).decode("ascii", "replace"))
            if ours < published:
                return PublishReport(
                    target=self.description,
                    errors={
                        GENERATION: f"refusing to publish journal generation "
                        f"{format_generation(ours)}: {format_generation(published)} is already "
                        f"published (a newer pass published first; if the journal was reset on "
                        f"purpose, remove {self.root / GENERATION})"
                    },
                )
            report = self._write(world)
            # Moved on only with the content: a pass that changes nothing writes nothing.
            if report.changed and ours > published:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{format_generation(ours)}\n".encode(), 0)
            return report
        finally:
            os.close(fd)

    def _write(self, world: TrustWorld) -> PublishReport:
        # Published files are never read back into the journal: whatever someone put in
        # their place (not PEM, another key, an expired certificate, 5 MB of anything) is
        # replaced from the journal and reported as drift.
        if world == self._in_place and not world.kept and tree_unchanged(self.root, self._seen):
            return PublishReport(target=self.description)
        files = {**self._kept_files(world), **desired_files(world)}
        tree = write_tree_atomic(self.root, files, managed=TOP_LEVEL, seen=self._seen)
        self._in_place = world if self._seen.whole is not None else None
        return PublishReport(target=self.description, changed=tree.changed, drifted=tree.edited)

    def _kept_files(self, world: TrustWorld) -> dict[str, tuple[Content, int]]:
        """The files of credentials the journal has none of, as they are published now
        (with the current bundle beside them): never removed for that alone."""
        files: dict[str, tuple[Content, int]] = {}
        for key in sorted(world.kept):
            client = key.removeprefix(KONG_PREFIX)
            folder = "linkerd" if key == LINKERD_ISSUER else f"kong/clients/{client}"
            try:
                crt = (self.root / folder / "tls.crt").read_bytes()
                key_pem = (self.root / folder / "tls.key").read_bytes()
            except OSError:
                continue  # never published: nothing to keep
            files[f"{folder}/tls.crt"] = (crt, CERT_MODE)
            files[f"{folder}/tls.key"] = (key_pem, KEY_MODE)
            files[f"{folder}/ca.crt"] = (world.bundle_pem.encode(), CERT_MODE)
        return files

    def _refusal(self) -> str | None:
        """Why ``root`` is not ours to publish into; creates it (0755) when missing.

        A symlink is never followed: whatever it points to is someone else's, and
        publishing replaces and removes entries there.
        """
        root = self.root
        if root.is_symlink():
            return (
                f"is a symlink (to {os.readlink(root)}): refusing to publish through it; "
                "make it a real directory or set publish.directory to the target"
            )
        if not root.exists():
            root.parent.mkdir(parents=True, exist_ok=True)
            root.mkdir(mode=DIR_MODE, exist_ok=True)
            os.chmod(root, DIR_MODE)  # whatever the umask
        info = root.lstat()
        if not stat.S_ISDIR(info.st_mode):
            return "is not a directory: refusing to publish there"
        if info.st_uid != os.geteuid():
            return (
                f"is owned by uid {info.st_uid}, not this daemon's uid {os.geteuid()}: "
                "refusing to publish into it"
            )
        return self._foreign(root)

    @staticmethod
    def _foreign(root: Path) -> str | None:
        """Why ``root`` holds what ca-daemon did not write, or None. Publishing replaces
        the entries it owns (``trust-bundle.pem``, ``linkerd``, ``kong``): in a directory
        someone else filled (``/etc``, a home) that would delete their files. Ours is a
        tree with ``..data``, or the flat layout an older ca-daemon wrote (its entries,
        with ``trust-bundle.pem`` among them), or empty."""
        if (root / DATA).is_symlink():
            return None
        # Hidden entries are ours (``..`` versions a crash left) or harmless; a volume's
        # lost+found is no one's data.
        names = {n for n in os.listdir(root) if not n.startswith(".") and n != "lost+found"}
        if not names or (names <= set(TOP_LEVEL) and "trust-bundle.pem" in names):
            return None
        shown = ", ".join(sorted(names)[:5]) + (" …" if len(names) > 5 else "")
        return (
            f"holds files ca-daemon did not write ({shown}): refusing to publish there, "
            "since publishing replaces and removes the entries it owns; set "
            "publish.directory to a new or empty directory"
        )
