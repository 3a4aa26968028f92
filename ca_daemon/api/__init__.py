"""The HTTP API: the server, its authentication and audit, and the CLI's client for it."""
