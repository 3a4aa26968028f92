"""Persistence of the rotation state: the Journal over a record store with check-and-set."""
