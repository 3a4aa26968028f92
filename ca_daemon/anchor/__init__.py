"""Where CA keys live: the local encrypted store or Vault/OpenBao, behind one interface."""
