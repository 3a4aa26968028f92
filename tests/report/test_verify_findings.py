"""The finding ids `verify` reports are the ones docs/reference.md lists, and Linkerd's
port lists are read as Linkerd reads them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ca_daemon.report.findings import CATALOG, Report
from ca_daemon.report.integration_checks import covers, port_ranges

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def _documented() -> dict[str, str]:
    """id -> severity, from the table of the reference's `verify` findings section."""
    section = REFERENCE.read_text().split("## `verify` findings", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z-]+)` \| (error|warning) \|", section, re.M)
    return dict(rows)


def test_every_finding_id_is_documented_with_its_severity() -> None:
    assert _documented() == {id: kind.severity.value for id, kind in CATALOG.items()}


def test_a_finding_prints_as_one_line_and_as_json() -> None:
    report = Report()
    report.add("key-mismatch", "linkerd issuer", "linkerd issuer: private key does not match")
    report.add("key-mismatch", "linkerd issuer", "linkerd issuer: private key does not match")
    (found,) = report.findings  # the same fact reached twice is one finding
    assert found.line == (
        "linkerd issuer: private key does not match [key-mismatch] fix: "
        + CATALOG["key-mismatch"].action
    )
    assert report.as_json("cluster") == {
        "version": 1,
        "target": "cluster",
        "ok": False,
        "findings": [
            {
                "id": "key-mismatch",
                "severity": "error",
                "object": "linkerd issuer",
                "message": "linkerd issuer: private key does not match",
                "action": CATALOG["key-mismatch"].action,
            }
        ],
        "checked": [],
        "skipped": [],
    }


# What linkerd2's GetPortRanges and ParsePortRange (pkg/util) make of an annotation.
PORT_LISTS = {
    "443": [(443, 443)],
    "25,4000-5000": [(25, 25), (4000, 5000)],
    " 80 , 400-500,": [(80, 80), (400, 500)],  # entries trimmed, one trailing comma dropped
    "80,,443": [(80, 80), (443, 443)],  # an empty entry is not a port
    "5000-4000,https,-1,65536,1-2-3": [],  # reversed, named, negative, too big, two dashes
    "": [],
}


@pytest.mark.parametrize(("value", "ranges"), PORT_LISTS.items(), ids=repr)
def test_linkerd_port_lists(value: str, ranges: list[tuple[int, int]]) -> None:
    assert port_ranges(value) == ranges


def test_a_range_covers_its_bounds_and_nothing_beside() -> None:
    ranges = port_ranges("4000-5000")
    assert [covers(ranges, p) for p in (3999, 4000, 5000, 5001)] == [False, True, True, False]
