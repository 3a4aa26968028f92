"""The variables the kubelet writes into a Pod for each Service of its namespace
(service links), told apart from configuration by their name and value.

A Service named ``ca-daemon`` (the chart's release name) gives every Pod of the
namespace ``CA_DAEMON_SERVICE_HOST``, ``CA_DAEMON_PORT`` and six more, all under the
daemon's own ``CA_DAEMON_`` prefix, and so does any Service named ``ca-daemon-*``. The
chart turns them off (``enableServiceLinks: false``), but a Pod spec written by hand may
not: the settings loader passes over exactly these shapes, each with a value as the
kubelet writes it (pkg/kubelet/envvars), so a misspelt setting is still refused.

For Service ``S`` (upper case, ``-`` as ``_``), ClusterIP ``IP``, first port ``P``:

| name                          | value                 |
|-------------------------------|-----------------------|
| ``S_SERVICE_HOST``            | ``IP``                |
| ``S_SERVICE_PORT``            | ``P``                 |
| ``S_SERVICE_PORT_<PORTNAME>`` | that port             |
| ``S_PORT``                    | ``tcp://IP:P``        |
| ``S_PORT_<n>_<TCP|UDP|SCTP>`` | ``tcp://IP:n``        |
| ``..._PROTO``                 | ``tcp``/``udp``/``sctp`` |
| ``..._PORT``                  | ``n``                 |
| ``..._ADDR``                  | ``IP``                |

(IPv6 addresses are bracketed in the URLs, as Go's ``net.JoinHostPort`` writes them.)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

# A Service name is a DNS-1035 label; the kubelet upper-cases it and turns '-' into '_'.
_SERVICE = r"[A-Z][A-Z0-9_]*"
_PROTOCOLS = ("TCP", "UDP", "SCTP")
_PORT_NUMBER = re.compile(r"[1-9][0-9]{0,4}")  # strconv.Itoa: no sign, no leading zero


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_port(value: str, expected: str | None = None) -> bool:
    if not _PORT_NUMBER.fullmatch(value) or int(value) > 65535:
        return False
    return expected is None or value == expected


def _is_link_url(value: str, protocol: str | None = None, port: str | None = None) -> bool:
    """``<protocol>://<IP>:<port>``, the IP bracketed when it is IPv6."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in (protocol or "tcp udp sctp").split():
        return False
    host, sep, number = rest.rpartition(":")
    if not sep or not _is_port(number, port):
        return False
    if host.startswith("[") and host.endswith("]"):
        return ":" in host and _is_ip(host[1:-1])
    return ":" not in host and _is_ip(host)


def _shapes() -> list[tuple[re.Pattern[str], Callable[[re.Match[str], str], bool]]]:
    port_n = rf"_PORT_(?P<n>[0-9]+)_(?P<proto>{'|'.join(_PROTOCOLS)})"
    return [
        (re.compile(rf"{_SERVICE}_SERVICE_HOST"), lambda m, v: _is_ip(v)),
        (re.compile(rf"{_SERVICE}_SERVICE_PORT"), lambda m, v: _is_port(v)),
        (re.compile(rf"{_SERVICE}_SERVICE_PORT_[A-Z0-9_]+"), lambda m, v: _is_port(v)),
        (re.compile(rf"{_SERVICE}_PORT"), lambda m, v: _is_link_url(v)),
        (
            re.compile(rf"{_SERVICE}{port_n}"),
            lambda m, v: _is_link_url(v, m["proto"].lower(), m["n"]),
        ),
        (re.compile(rf"{_SERVICE}{port_n}_PROTO"), lambda m, v: v == m["proto"].lower()),
        (re.compile(rf"{_SERVICE}{port_n}_PORT"), lambda m, v: _is_port(v, m["n"])),
        (re.compile(rf"{_SERVICE}{port_n}_ADDR"), lambda m, v: _is_ip(v)),
    ]


_SHAPES = _shapes()


def is_service_link(name: str, value: str) -> bool:
    """True for a variable of one of the kubelet's service-link shapes whose value is
    what the kubelet writes there. A name may fit several shapes (``S_PORT_80_TCP_PORT``
    is also ``S_PORT`` of a Service named ``S_PORT_80_TCP``): any that fits will do."""
    for pattern, value_fits in _SHAPES:
        match = pattern.fullmatch(name)
        if match is not None and value_fits(match, value):
            return True
    return False
