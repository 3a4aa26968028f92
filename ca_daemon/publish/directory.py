"""Publish the trust world as files, the embedded default's output.

Every file is replaced atomically and only when its content changes; keys are 0600.
Files of roots or clients no longer in the world are removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ca_daemon.files import write_atomic
from ca_daemon.pki.bundle import render_pem, stable_id
from ca_daemon.publish.base import PublishReport
from ca_daemon.world import TrustWorld

KEY_MODE = 0o600
CERT_MODE = 0o644


def desired_files(world: TrustWorld) -> dict[str, tuple[bytes, int]]:
    """Relative path → (content, mode) for everything the directory must hold."""
    bundle = world.bundle_pem.encode()
    files: dict[str, tuple[bytes, int]] = {"trust-bundle.pem": (bundle, CERT_MODE)}
    if world.linkerd_issuer is not None:
        issuer = world.linkerd_issuer
        files["linkerd/ca.crt"] = (bundle, CERT_MODE)
        files["linkerd/tls.crt"] = (render_pem([issuer.cert]).encode(), CERT_MODE)
        files["linkerd/tls.key"] = (issuer.key_pem, KEY_MODE)
    for root in world.roots:
        files[f"kong/ca/{stable_id(root)}.pem"] = (render_pem([root]).encode(), CERT_MODE)
    for name, client in world.kong_clients.items():
        chain = render_pem([client.cert, *client.chain]).encode()
        files[f"kong/clients/{name}/tls.crt"] = (chain, CERT_MODE)
        files[f"kong/clients/{name}/tls.key"] = (client.key_pem, KEY_MODE)
        files[f"kong/clients/{name}/ca.crt"] = (bundle, CERT_MODE)
    return files


class DirectoryPublisher:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"directory {root}"

    def publish(self, world: TrustWorld) -> PublishReport:
        """Write what differs, remove what is stale; report the relative paths changed."""
        files = desired_files(world)
        changed = [
            rel
            for rel, (content, mode) in sorted(files.items())
            if write_atomic(self.root / rel, content, mode)
        ]
        changed += self._remove_stale(files)
        return PublishReport(target=self.description, changed=changed)

    def _remove_stale(self, files: dict[str, tuple[bytes, int]]) -> list[str]:
        removed = []
        ca_dir = self.root / "kong" / "ca"
        if ca_dir.is_dir():
            for path in sorted(ca_dir.glob("*.pem")):
                rel = path.relative_to(self.root).as_posix()
                if rel not in files:
                    path.unlink()
                    removed.append(rel)
        clients_dir = self.root / "kong" / "clients"
        if clients_dir.is_dir():
            for path in sorted(clients_dir.iterdir()):
                rel = path.relative_to(self.root).as_posix()
                if not any(f.startswith(rel + "/") for f in files):
                    shutil.rmtree(path)
                    removed.append(rel + "/")
        if not any(f.startswith("linkerd/") for f in files):
            for name in ("ca.crt", "tls.crt", "tls.key"):
                path = self.root / "linkerd" / name
                if path.exists():
                    path.unlink()
                    removed.append(f"linkerd/{name}")
        return removed
