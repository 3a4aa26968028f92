"""Where CA keys live: the local encrypted store or Vault/OpenBao, behind one interface."""

from __future__ import annotations

from ca_daemon.anchor.base import CA, Anchor, AnchorError

__all__ = ["CA", "Anchor", "AnchorError"]
