"""Deciding and carrying out what the trust world must look like: plan and engine."""
