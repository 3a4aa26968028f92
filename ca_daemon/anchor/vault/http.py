"""The wire under ``VaultClient.request``: one urllib3 connection pool per Vault address.

Every certificate the daemon issues costs two Vault requests (sign, journal write), so
the per-request cost on the client side bounds issuance on a small machine. hvac's
adapter goes through ``requests``, which on every call re-reads the environment
(proxies, ``~/.netrc``), stats the CA bundle path and merges settings; profiled, that was
over half of the daemon's CPU per certificate. Here all of that is decided once, when the
client is built: the TLS context (``ca_cert``, else requests' own choice:
``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``, else certifi), the proxy from the environment,
the fixed headers. A request is then one ``urlopen`` on a warm keep-alive connection.

Errors are hvac's exception types with hvac's fields, so the caller's mapping to the
daemon's errors (and its re-login on 403) is the same whichever wire carried the call.
hvac itself still does the logins, lookups and renewals (rare, and its auth helpers know
each method's payload).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import certifi
import hvac.exceptions
import urllib3
import urllib3.exceptions
from urllib3.util import Retry, Timeout

from ca_daemon.errors import VaultError

# Like requests' default: no retry of a request that may have reached Vault, redirects
# followed (a standby that does not forward answers 307 to the active node).
_RETRIES = Retry(total=None, connect=0, read=0, status=0, other=0, redirect=30)
_NO_RETRIES = Retry(total=None, connect=0, read=0, status=0, other=0, redirect=False)
_REDIRECTS = {301, 302, 303, 307, 308}


class VaultUnreachable(VaultError):
    """No answer from Vault (connection refused, TLS failure, timeout); the message names
    only the exception type, never the request."""


def _ca_file(ca_cert: str | None) -> str:
    return (
        ca_cert
        or os.environ.get("REQUESTS_CA_BUNDLE")
        or os.environ.get("CURL_CA_BUNDLE")
        or certifi.where()
    )


def _proxy(address: str) -> str | None:
    """The proxy requests would use for ``address`` (``HTTP(S)_PROXY``, ``NO_PROXY``)."""
    host = urlsplit(address).hostname or ""
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies_environment().get(urlsplit(address).scheme)


class VaultHttp:
    """Requests to one Vault address over at most ``pool_size`` kept-alive connections
    (more threads than that still proceed; their extra connections are not kept)."""

    def __init__(
        self,
        address: str,
        *,
        namespace: str | None,
        ca_cert: str | None,
        timeout: float,
        pool_size: int,
    ) -> None:
        self.address = address.rstrip("/")
        options: dict[str, Any] = {
            "num_pools": 4,
            "maxsize": pool_size,
            "block": False,
            "retries": _RETRIES,
            "timeout": Timeout(connect=timeout, read=timeout),
        }
        if self.address.startswith("https://"):
            options["ssl_context"] = ssl.create_default_context(cafile=_ca_file(ca_cert))
        proxy = _proxy(self.address)
        self._http: urllib3.PoolManager = (
            urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
        )
        # The address's own pool, taken once: the manager's per-call URL parsing and pool
        # lookup were a tenth of the client's CPU per request. Through a proxy, the
        # manager decides (it rewrites the request line).
        self._pool = None if proxy else self._http.connection_from_url(self.address)
        self._headers = {"X-Vault-Request": "true", "Content-Type": "application/json"}
        if namespace:
            self._headers["X-Vault-Namespace"] = namespace

    def request(
        self, method: str, path: str, token: str | None, body: dict[str, Any] | None = None
    ) -> Any:
        """The JSON answer of a 200, None for any other success; hvac's exception for the
        status otherwise (InvalidPath for 404, Forbidden for 403, ...)."""
        while "//" in path:  # Vault reads a double slash as one; so did hvac
            path = path.replace("//", "/")
        path = "/" + path.strip("/")
        url = self.address + path
        headers = dict(self._headers)
        if token:
            headers["X-Vault-Token"] = token
        if method == "PATCH":
            headers["Content-Type"] = "application/merge-patch+json"
        payload = None if body is None else json.dumps(body).encode()
        try:
            if self._pool is None:
                response = self._http.urlopen(method, url, body=payload, headers=headers)
            else:
                response = self._pool.urlopen(
                    method, path, body=payload, headers=headers, retries=_NO_RETRIES
                )
                if response.status in _REDIRECTS and response.headers.get("Location"):
                    # Rare (a standby that does not forward): the manager follows it,
                    # to another host too.
                    response = self._http.urlopen(method, url, body=payload, headers=headers)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # With retries off, urllib3 still wraps the cause (refused, timeout, TLS).
            cause = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
            raise VaultUnreachable(type(cause or exc).__name__) from None
        if response.status >= 400:
            raise _error(method, url, response)
        if response.status != 200:
            return None
        try:
            return json.loads(response.data)
        except ValueError:
            return None

    def close(self) -> None:
        self._http.clear()


def _error(method: str, url: str, response: urllib3.BaseHTTPResponse) -> hvac.exceptions.VaultError:
    """The exception hvac raises for this answer, with the same message and errors."""
    text = response.data.decode(errors="replace")
    errors = None
    if response.headers.get("Content-Type") == "application/json":
        try:
            errors = json.loads(text).get("errors")
        except (ValueError, AttributeError):
            errors = None
    return hvac.exceptions.VaultError.from_status(
        response.status,
        None if errors is not None else text,
        errors=errors,
        method=method,
        url=url,
        text=text,
    )
