"""Durations as operators write them: ``48h``, ``30m``, ``8760h``, ``90s``, ``1h30m``."""

from __future__ import annotations

import re
from datetime import timedelta

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

# Far beyond any certificate lifetime, far below what timedelta (and X.509 dates) can hold.
MAX_DURATION = timedelta(days=36525)
MAX_DURATION_TEXT = "100 years (876600h)"


def parse_duration(text: str) -> timedelta:
    """Parse a Go-style duration string; ``d`` (days) is accepted as a convenience."""
    value = text.strip()
    if not value:
        raise ValueError("empty duration")
    pos = 0
    seconds = 0.0
    for match in _PART.finditer(value):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(value):
        raise ValueError(f"invalid duration {text!r}: use a number and a unit, e.g. 48h, 30m, 90s")
    if not seconds <= MAX_DURATION.total_seconds():  # also catches inf from huge digit strings
        raise ValueError(f"duration {text!r} is too long: at most {MAX_DURATION_TEXT}")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Render a duration the way it would be written in configuration (``1h30m``)."""
    total = int(value.total_seconds())
    if total == 0:
        return "0s"
    sign = "-" if total < 0 else ""
    total = abs(total)
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{seconds}s" if seconds else "",
    ]
    return sign + "".join(parts)
