"""The values configuration accepts, as pydantic types: durations with a unit, and the
names Kubernetes, X.509 and Kong will take (checked at start-up: a name the apiserver
would refuse exits 2 instead of failing one object on every pass)."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from datetime import timedelta
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, PlainSerializer

from ca_daemon.util.durations import format_duration, parse_duration

# X.509 (RFC 5280, ub-common-name) allows a common name of at most 64 characters.
MAX_COMMON_NAME = 64


def _to_timedelta(value: object) -> object:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError("a duration needs a unit, e.g. 48h, 30m, 90s")
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(_to_timedelta),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]

# Kubernetes object and file names are derived from client names: keep them DNS labels,
# which also keeps them from walking out of the publish directory. The rules are the
# apiserver's (k8s.io/apimachinery/pkg/util/validation): checked here, a name it would
# refuse exits 2 at start-up instead of failing one object on every pass.
_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL = re.compile(_LABEL)
_DNS_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_DNS1035_LABEL = re.compile("[a-z]([-a-z0-9]*[a-z0-9])?")
_CONFIGMAP_KEY = re.compile("[-._a-zA-Z0-9]+")
MAX_LABEL = 63
MAX_SUBDOMAIN = 253


def check_dns_label(value: str) -> str:
    if len(value) > MAX_LABEL or not _DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"is not a DNS label (at most {MAX_LABEL} lowercase letters, digits "
            "and '-', starting and ending with a letter or digit)"
        )
    return value


def check_dns_subdomain(value: str) -> str:
    if len(value) > MAX_SUBDOMAIN or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(
            f"is not a valid Kubernetes object name (at most {MAX_SUBDOMAIN} "
            "characters: DNS labels of lowercase letters, digits and '-' joined by '.')"
        )
    return value


def check_service_name(value: str) -> str:
    if len(value) > MAX_LABEL or not _DNS1035_LABEL.fullmatch(value):
        raise ValueError(
            f"is not a Kubernetes Service name (at most {MAX_LABEL} lowercase "
            "letters, digits and '-', starting with a letter)"
        )
    return value


# Kong CA objects are named after their root: the Kong-wide CA Secret and, per Service
# namespace with verify_upstream, the CA reference ConfigMap. No configured object may
# take such a name, or two owners would fight over one object.
_KONG_CA_OBJECT = re.compile("kong-upstream-ca-[0-9a-f]{8}")


def kong_ca_object_name(sha256_hex: str) -> str:
    return f"kong-upstream-ca-{sha256_hex[:8]}"


def check_not_kong_ca_name(value: str) -> str:
    if _KONG_CA_OBJECT.fullmatch(value):
        raise ValueError(
            "is reserved: kong-upstream-ca-<8 hex> names the Kong CA objects ca-daemon "
            "publishes per trusted root"
        )
    return value


def check_configmap_key(value: str) -> str:
    if (
        len(value) > MAX_SUBDOMAIN
        or not _CONFIGMAP_KEY.fullmatch(value)
        or value.startswith("..")
        or value == "."
    ):
        raise ValueError(
            f"is not a ConfigMap key (at most {MAX_SUBDOMAIN} letters, digits, "
            "'-', '_' and '.', not '.' and not starting with '..')"
        )
    return value


def _control_characters(value: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value)


def _common_name(value: str) -> str:
    if not 1 <= len(value) <= MAX_COMMON_NAME:
        raise ValueError(
            f"must be 1 to {MAX_COMMON_NAME} characters (the X.509 limit), not {len(value)}"
        )
    if _control_characters(value):
        raise ValueError("must not contain control characters (newline, tab, ...)")
    return value


# A SAN dNSName: a hostname of letters, digits and '-' (a leading '*.' wildcard allowed).
_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?")


def _dns_name(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        raise ValueError("is an IP address, not a DNS name (IP SANs are not supported)")
    labels = value.removeprefix("*.").split(".")
    if len(value) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
        raise ValueError("is not a DNS hostname (dot-separated labels of letters, digits and '-')")
    return value


# A SAN uniformResourceIdentifier: scheme ':' and more, printable ASCII, no spaces.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[!-~]+")


def _uri(value: str) -> str:
    if not _URI.fullmatch(value):
        raise ValueError(
            "is not a URI (scheme:rest in printable ASCII without spaces, "
            "e.g. spiffe://cluster.local/ns/kong/sa/kong)"
        )
    return value


CommonName = Annotated[str, AfterValidator(_common_name)]
DnsName = Annotated[str, AfterValidator(_dns_name)]
Uri = Annotated[str, AfterValidator(_uri)]

DnsLabel = Annotated[
    str, BeforeValidator(lambda v: check_dns_label(v) if isinstance(v, str) else v)
]
ObjectName = Annotated[
    str, BeforeValidator(lambda v: check_dns_subdomain(v) if isinstance(v, str) else v)
]
