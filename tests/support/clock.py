"""The fixed instant the server-free tests run at."""

from __future__ import annotations

from datetime import UTC, datetime

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
