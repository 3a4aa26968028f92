"""YAML read and written with libyaml (PyYAML's C binding) where it is there.

A 5,000-client configuration is read in ~0.2 s with it and ~1 s without, and `config
check` writes it back in ~0.5 s, not ~3 s. libyaml words its errors differently, so text it
refuses is read again by the pure-Python loader, whose messages (what, line, column) the
configuration's errors are built from.
"""

from __future__ import annotations

from typing import Any

import yaml

_LOADER = getattr(yaml, "CSafeLoader", None)
_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load(text: str) -> Any:
    """``yaml.safe_load(text)``, faster; raises what it raises."""
    if _LOADER is not None:
        try:
            return yaml.load(text, Loader=_LOADER)
        except yaml.YAMLError:
            pass
    return yaml.safe_load(text)


def dump(data: Any) -> str:
    """``yaml.safe_dump(data, sort_keys=False)``, faster."""
    return yaml.dump(data, Dumper=_DUMPER, sort_keys=False)
