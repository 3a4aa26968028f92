"""Keys, certificate profiles, trust bundles and chain checks: pure, no I/O."""
