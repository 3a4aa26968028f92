"""Record stores the journal writes through: files on disk or Vault KV v2."""
