"""`rotate --wait` gives up on a daemon unavailable for TRANSIENT_SECONDS in a row, counted
on the clock: each poll of an address that vanished (a deleted Pod's IP) can take a whole
connect timeout, so counting polls would wait for hours."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from ca_daemon.api import client as client_module
from ca_daemon.api.client import Client
from ca_daemon.errors import ApiError


def test_waiting_on_an_unreachable_daemon_is_bounded_by_time_not_by_polls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    now = [0.0]
    polls: list[float] = []

    def slow_request(*args: Any, **kwargs: Any) -> Any:
        polls.append(now[0])
        now[0] += 30.0  # as a connect timeout to a vanished Pod IP takes
        raise client_module.httpx.ConnectTimeout("timed out")

    monkeypatch.setattr(client_module.httpx, "request", slow_request)
    said: list[str] = []
    api = Client(f"http://127.0.0.1:{port}", "token")
    with pytest.raises(ApiError, match="unreachable"):
        api.follow("op", said.append, sleep=lambda s: now.__setitem__(0, now[0] + s),
                   clock=lambda: now[0])  # fmt: skip
    # Given up once TRANSIENT_SECONDS had passed, about ten polls, not three hundred.
    assert client_module.TRANSIENT_SECONDS <= now[0] <= client_module.TRANSIENT_SECONDS + 2 * 31
    assert len(polls) < 15
    assert said == [f"http://127.0.0.1:{port}: unreachable (ConnectTimeout); still waiting"]
