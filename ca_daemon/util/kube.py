"""Talking to the Kubernetes API: one client, and errors an operator can act on."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import urllib3.exceptions
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ca_daemon.errors import KubeError

# How an error says that the API server did not answer at all (see describe).
UNREACHABLE = "API server unreachable"
# Bounded so that an unreachable API server fails a pass instead of hanging it.
REQUEST_TIMEOUT = (5, 20)


class KubeConflict(KubeError):
    """The object changed since it was read (409): re-read and decide again."""


# How often the client's token hook may run (see throttled).
REFRESH_EVERY = 1.0


def throttled(
    hook: Callable[[Any], None],
    every: float = REFRESH_EVERY,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[Any], None]:
    """The kubeconfig and in-cluster loaders install a hook that runs before every
    request: it re-reads an expired token, and sets the host, TLS files and proxy on the
    configuration again each time (the host setter scans the environment for proxies).
    Thousands of writes a pass spent more CPU in it than in their own requests; at most
    once a second still picks a rotated token up within a second."""
    lock = threading.Lock()
    last: float | None = None

    def run(configuration: Any) -> None:
        nonlocal last
        now = clock()
        with lock:
            if last is not None and now - last < every:
                return
            last = now
        hook(configuration)

    return run


def _throttle_refresh(api: client.ApiClient) -> client.ApiClient:
    configuration = api.configuration
    hook = getattr(configuration, "refresh_api_key_hook", None)
    if hook is None:
        return api
    limited = throttled(hook)

    def refresh(target: Any) -> None:
        limited(target)
        # The loader's hook installs itself again each time it runs.
        target.refresh_api_key_hook = refresh

    configuration.refresh_api_key_hook = refresh
    return api


def api_client(
    kubeconfig: Path | None = None, *, retries: bool | None = None, context: str | None = None
) -> client.ApiClient:
    """In-cluster configuration when running in a Pod, else the kubeconfig (or KUBECONFIG).

    ``retries=False``: no urllib3 retries, so a request ends within its own timeout (the
    Lease's client: by default urllib3 tries a connection that times out four times)."""
    configuration = client.Configuration()
    configuration.retries = retries
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return _throttle_refresh(client.ApiClient(configuration))
    path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG")
    try:
        api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=path, context=context, client_configuration=configuration
        )
        return _throttle_refresh(api)
    except (config.ConfigException, OSError) as exc:
        where = f"{path or '~/.kube/config'}" + (f" (context {context})" if context else "")
        raise KubeError(f"cannot load kubeconfig {where}: {exc}") from None


def api_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or exc.status)


def describe(exc: Exception, what: str) -> KubeError:
    """Turn a client exception into a KubeError that names the call."""
    if isinstance(exc, ApiException):
        if exc.status == 403:
            return KubeError(f"{what}: forbidden by RBAC: {api_message(exc)}")
        if exc.status == 401:
            return KubeError(f"{what}: not authenticated (token expired or invalid)")
        return KubeError(f"{what}: API server said {exc.status}: {api_message(exc)}")
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return KubeError(f"{what}: {UNREACHABLE} ({type(exc).__name__})")
    return KubeError(f"{what}: {exc}")


def call(
    what: str, fn: Any, *args: Any, missing_ok: bool = False, raw: bool = False, **kwargs: Any
) -> Any:
    """Run one API call with a timeout. With ``missing_ok`` a 404 returns None; every
    other failure is a KubeError (KubeConflict for 409). With ``raw`` the answer is the
    decoded JSON, not the client's models: building a model per object costs more CPU
    than the request itself when a LIST returns thousands, or when a write's answer is
    thrown away."""
    try:
        if raw:
            response = fn(*args, _request_timeout=REQUEST_TIMEOUT, _preload_content=False, **kwargs)
            try:
                body = response.read()
            finally:
                response.release_conn()
            try:
                return json.loads(body) if body else None
            except ValueError:
                raise KubeError(f"{what}: the API server's answer is not JSON") from None
        return fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
    except ApiException as exc:
        if exc.status == 404 and missing_ok:
            return None
        if exc.status == 409:
            raise KubeConflict(f"{what}: changed meanwhile ({api_message(exc)})") from None
        raise describe(exc, what) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise describe(exc, what) from None
