"""Vault / OpenBao as the anchor: the authenticated client, its wire, the PKI mounts."""
