from datetime import timedelta

import pytest

from ca_daemon.util.durations import format_duration, parse_duration

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48h", timedelta(hours=48)),
        ("30m", timedelta(minutes=30)),
        ("90s", timedelta(seconds=90)),
        ("8760h", timedelta(hours=8760)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2d", timedelta(days=2)),
    ],
)
def test_parses_operator_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "48", "h", "10x", "1h 30m", "-5m"])
def test_rejects_malformed_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_round_trips() -> None:
    for text in ("48h", "30m", "1h30m", "8760h", "1h0m5s"):
        assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)
    assert format_duration(timedelta(hours=2920)) == "2920h"
