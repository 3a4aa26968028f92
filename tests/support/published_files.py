"""The directory publisher's output as a reader finds it, through the documented paths."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def documented_files(out: Path) -> dict[str, int]:
    """Relative path → mode of every file reachable through the documented paths."""
    found = {}
    for dirpath, dirs, names in os.walk(out, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith("..")]  # the kubelet's own entries
        for name in names:
            if not name.startswith(".."):
                path = Path(dirpath) / name
                found[path.relative_to(out).as_posix()] = stat.S_IMODE(path.stat().st_mode)
    return found
