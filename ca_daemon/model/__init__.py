"""The vocabulary every layer shares: the journaled state, the trust world, generations."""
