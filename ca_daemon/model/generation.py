"""The journal generation a published object was derived from.

A publisher never overwrites (or deletes) an object that carries a newer generation than
the pass that would write it: a deposed leader that resumes cannot take the world back.

A generation is (epoch, CA-record version, credential-record version), compared in that
order. Store versions restart when a journal is rebuilt (a Vault KV secret deleted with its
metadata starts again at version 1), so a rebuild starts a new epoch, and everything
derived from the rebuilt journal is newer than anything derived from the lost one.
"""

from __future__ import annotations

from ca_daemon.model.world import TrustWorld

Generation = tuple[int, int, int]
UNKNOWN: Generation = (0, 0, 0)


def generation_of(world: TrustWorld, credential: str | None = None) -> Generation:
    """What ``world`` publishes for ``credential`` (or for the CA alone) is derived from."""
    if world.generation <= 0:
        return UNKNOWN  # not derived from a journal (tests, tools): never fenced
    version = world.versions.get(credential, 0) if credential else 0
    return (world.epoch, world.generation, version)


def format_generation(generation: Generation) -> str:
    return ".".join(str(part) for part in generation)


def parse_generation(text: str | None) -> Generation:
    """The generation an object carries; UNKNOWN when it has none or an unreadable one.

    Objects written before epochs existed carry "<ca>.<credential>" (or "<ca>" alone):
    epoch 0.
    """
    parts = (text or "").strip().split(".")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        return UNKNOWN
    numbers = [int(p) for p in parts]
    if len(parts) == 1:
        return (0, numbers[0], 0)
    if len(parts) == 2:
        return (0, numbers[0], numbers[1])
    return (numbers[0], numbers[1], numbers[2])
