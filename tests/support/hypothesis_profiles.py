"""Hypothesis profiles: ``ci`` (loaded by default: bounded, the same paths on every run, so
a removed guard fails every time) and ``prove`` (``make prove``: long, random paths, the
examples it found kept in .hypothesis/, which is not committed).

Registered by a plugin module because ``--hypothesis-profile`` is read before any test
module is imported."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "ci",
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=_SLOW_IS_FINE,
)
settings.register_profile(
    "prove",
    max_examples=int(os.environ.get("CA_DAEMON_PROVE_EXAMPLES", "3000")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=_SLOW_IS_FINE,
)
settings.load_profile("ci")
