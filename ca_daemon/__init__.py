"""ca-daemon: one trust chain for Linkerd and Kong, rooted in Vault."""

__version__ = "0.1.0"
