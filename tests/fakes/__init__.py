"""Stand-ins for servers that cannot run in the test environment, each a real HTTP server."""
