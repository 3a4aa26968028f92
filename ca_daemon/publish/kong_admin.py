"""Publish Kong client and CA certificates through the Kong Admin API (delivery admin-api).

Every entity the daemon writes has an id it can compute again, so a pass is a plain
reconciliation that needs no memory of earlier passes:

- a client's Certificate id is a UUIDv5 of the client's name, so a rotation replaces the
  same entity in place (Kong 3.x gives new upstream connections the new certificate
  without a restart) and the Service keeps pointing at it;
- a root's CA Certificate id is ``stable_id(root)``, a UUIDv5 of its SHA-256.

Writes happen only where the live entity differs, ``PUT`` (an upsert that replaces) is sent
with every field, and everything the daemon owns carries ``MANAGED_TAG``: entities without
it are never changed or deleted. Every write is read back: Kong (or a proxy in front of
it) answering 200 while holding something else is a publish failure, not a success. A
client with ``verify_upstream`` has its Service list the trusted roots' CA Certificates in
``ca_certificates``, with ``tls_verify`` on; the daemon owns both fields there. A retired
root is deleted only once no Service lists it in ``ca_certificates``. Kong in DB-less mode
refuses every Admin API write; that is detected up front and reported once, with nothing
written.

Tested against a stand-in Kong (tests/support/fake_kong_admin.py) that enforces Kong's entity rules,
because no Kong binary can run in this project's test environment.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from ca_daemon.config.settings import KongClient, KongConfig
from ca_daemon.errors import PublishError
from ca_daemon.model.generation import (
    UNKNOWN,
    Generation,
    format_generation,
    generation_of,
    parse_generation,
)
from ca_daemon.model.world import TrustWorld
from ca_daemon.pki.bundle import KONG_ID_NAMESPACE, render_pem, stable_id
from ca_daemon.publish.base import PublishReport

MANAGED_TAG = "managed-by-ca-daemon"
ROOT_TAG = "ca-daemon-root"
CLIENT_TAG_PREFIX = "ca-daemon-client-"
# The journal generation an entity was written from (ca_daemon/model/generation.py): a
# writer holding an older journal (a deposed leader) must not overwrite or delete it.
GENERATION_TAG_PREFIX = "ca-daemon-generation:"
TOKEN_HEADER = "Kong-Admin-Token"
# Kong accepts client_certificate (and ca_certificates, tls_verify) only on these protocols.
TLS_PROTOCOLS = ("https", "tls")
TIMEOUT_SECONDS = 10.0

Entity = dict[str, Any]


def client_certificate_id(name: str) -> str:
    """The Kong Certificate id of a client: the same for every certificate it is ever issued."""
    return str(uuid.uuid5(KONG_ID_NAMESPACE, f"kong-client:{name}"))


# --- what Kong must hold (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class ServiceWant:
    certificate: str  # the client's Certificate id
    ca_certificates: tuple[str, ...] = ()  # with verify_upstream: every trusted root's

    def body(self) -> Entity:
        """The fields to PATCH (only those the daemon owns on this Service)."""
        body: Entity = {"client_certificate": {"id": self.certificate}}
        if self.ca_certificates:
            body |= {"ca_certificates": list(self.ca_certificates), "tls_verify": True}
        return body


def _service_view(service: Mapping[str, Any], want: ServiceWant) -> dict[str, Any]:
    """The fields of ``service`` the daemon owns, as compared: Kong keeps ca_certificates
    in the order sent, and the order means nothing to it."""
    view: dict[str, Any] = {
        "client_certificate": (service.get("client_certificate") or {}).get("id")
    }
    if want.ca_certificates:
        view["ca_certificates"] = sorted(service.get("ca_certificates") or [])
        view["tls_verify"] = service.get("tls_verify")
    return view


@dataclass(frozen=True)
class Desired:
    certificates: dict[str, Entity]  # Certificate id → every field we PUT
    ca_certificates: dict[str, Entity]  # CA Certificate id → every field we PUT
    services: dict[str, ServiceWant]  # Kong Service name or id → what it must use
    problems: dict[str, str] = field(default_factory=dict)  # object → why it cannot be met
    generation: Generation = UNKNOWN  # of the CA part of the world


def _generation_tags(generation: Generation) -> list[str]:
    return [] if generation == UNKNOWN else [GENERATION_TAG_PREFIX + format_generation(generation)]


def entity_generation(entity: Mapping[str, Any] | None) -> Generation:
    """The generation tag a live entity carries; UNKNOWN when none."""
    for tag in (entity or {}).get("tags") or []:
        if isinstance(tag, str) and tag.startswith(GENERATION_TAG_PREFIX):
            return parse_generation(tag.removeprefix(GENERATION_TAG_PREFIX))
    return UNKNOWN


def desired_entities(world: TrustWorld, clients: Sequence[KongClient]) -> Desired:
    certificates = {
        client_certificate_id(name): {
            "cert": render_pem([issued.cert, *issued.chain]),
            "key": issued.key_pem.decode(),
            # PUT replaces the entity: send every field, so an alternate pair (an ECDSA/RSA
            # twin someone added) cannot outlive a rotation of the primary one.
            "cert_alt": None,
            "key_alt": None,
            "tags": [
                MANAGED_TAG,
                f"{CLIENT_TAG_PREFIX}{name}",
                *_generation_tags(generation_of(world, f"kong/{name}")),
            ],
        }
        for name, issued in sorted(world.kong_clients.items())
    }
    ca_tags = _generation_tags(generation_of(world))
    ca_certificates = {
        stable_id(root): {"cert": render_pem([root]), "tags": [MANAGED_TAG, ROOT_TAG, *ca_tags]}
        for root in world.roots
    }
    wanted: dict[str, list[KongClient]] = {}
    for client in clients:
        if client.service and client.name in world.kong_clients:
            wanted.setdefault(client.service, []).append(client)
    roots = tuple(stable_id(root) for root in world.roots)
    services: dict[str, ServiceWant] = {}
    problems: dict[str, str] = {}
    for service, named in wanted.items():
        if len(named) > 1:
            # A Service has one client certificate; picking one would flap between passes.
            problems[f"service/{service}"] = (
                f"clients {', '.join(c.name for c in named)} all name this Kong Service, which "
                "can use only one client certificate: give each client its own service"
            )
        else:
            (client,) = named
            services[service] = ServiceWant(
                client_certificate_id(client.name), roots if client.verify_upstream else ()
            )
    return Desired(certificates, ca_certificates, services, problems, generation_of(world))


def _comparable(entity: Mapping[str, Any] | None, fields: Sequence[str]) -> dict[str, Any] | None:
    """The fields we own, normalized the way Kong may hand them back (whitespace, tag order)."""
    if entity is None:
        return None
    view: dict[str, Any] = {}
    for name in fields:
        value = entity.get(name)
        if isinstance(value, str):
            value = value.strip()
        elif name == "tags":
            # The generation alone changing is no reason to write: it fences, it is not content.
            value = sorted(t for t in value or [] if not str(t).startswith(GENERATION_TAG_PREFIX))
        view[name] = value
    return view


def _digest(view: Mapping[str, Any] | None) -> str:
    # Only a digest is remembered between passes, never the (key-bearing) entity itself.
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()


_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.S)
# A run of base64 long enough to be part of a key (a P-256 PKCS#8 body line is 64 chars);
# shorter runs are ids, hashes' prefixes and words, which stay readable.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{32,}(?:\\n|\s)*(?:[A-Za-z0-9+/=]{4,}(?:\\n|\s)*)*")


def _redact(text: str) -> str:
    """Kong's messages never echo a key, but a proxy in front of it might, whole or cut:
    never pass on PEM, nor a run of base64 that could be a piece of one."""
    return _BASE64_RUN.sub("<base64 redacted>", _PEM_BLOCK.sub("<PEM redacted>", text))


def _kong_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = str(body.get("message")) if isinstance(body, dict) else response.text
    except ValueError:
        message = response.text
    return f"HTTP {response.status_code}: {_redact(message.strip())[:300]}"


def _display_url(url: str) -> str:
    """The URL without any user:password, fit for reports and logs."""
    return re.sub(r"//[^/@]*@", "//", url)


# --- talking to Kong (I/O) --------------------------------------------------------------------


class KongUnavailable(PublishError):
    """The Admin API cannot be used at all this pass (unreachable, refused token, DB-less)."""


class KongRefused(PublishError):
    """Kong refused one request; the message is Kong's own, safe to report."""


class KongMismatch(KongRefused):
    """Kong accepted a write but, read back, holds something else."""


class KongAdminPublisher:
    def __init__(self, kong: KongConfig, transport: httpx.BaseTransport | None = None) -> None:
        if not kong.admin_api.url:
            raise ValueError("kong.admin_api.url is required for delivery admin-api")
        self.kong = kong
        self.url = kong.admin_api.url.rstrip("/")
        self.description = f"kong admin-api {_display_url(self.url)}"
        self._transport = transport
        # Object → digest of what this process last wrote or confirmed there: how a later
        # pass tells someone else's edit (drift) from a rotation of its own.
        self._last: dict[str, str] = {}

    def publish(self, world: TrustWorld) -> PublishReport:
        report = PublishReport(target=self.description)
        desired = desired_entities(world, self.kong.clients)
        report.errors.update(desired.problems)
        try:
            with self._client() as http:
                admin = _Admin(http, _display_url(self.url))
                admin.check_writable()
                _Pass(admin, report, self._last).run(desired)
        except KongUnavailable as exc:
            report.errors["kong"] = str(exc)
        return report

    @contextmanager
    def _client(self) -> Iterator[httpx.Client]:
        api = self.kong.admin_api
        headers = {}
        if api.token_file is not None:
            # Read every pass: a mounted Secret may rotate the token under a running daemon.
            try:
                headers[TOKEN_HEADER] = api.token_file.read_text().strip()
            except OSError as exc:
                raise KongUnavailable(
                    f"cannot read kong.admin_api.token_file {api.token_file}: {exc.strerror}"
                ) from None
        verify: ssl.SSLContext | bool = True
        if api.ca_cert is not None:
            try:
                verify = ssl.create_default_context(cafile=str(api.ca_cert))
            except (OSError, ssl.SSLError) as exc:
                raise KongUnavailable(
                    f"cannot load kong.admin_api.ca_cert {api.ca_cert}: {exc}"
                ) from None
        with httpx.Client(
            base_url=self.url,
            headers=headers,
            verify=verify,
            timeout=TIMEOUT_SECONDS,
            transport=self._transport,
        ) as http:
            yield http


class _Admin:
    """Kong Admin API calls, with Kong's failures turned into exceptions that say what to do."""

    def __init__(self, http: httpx.Client, url: str) -> None:
        self.http = http
        self.url = url

    def request(
        self,
        method: str,
        path: str,
        body: Entity | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        try:
            response = self.http.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise KongUnavailable(
                f"cannot reach the Kong Admin API at {self.url}: {type(exc).__name__}: {exc}"
            ) from None
        if response.status_code == 401:
            raise KongUnavailable(
                f"the Kong Admin API at {self.url} refused the credentials "
                f"({_kong_message(response)}); check kong.admin_api.token_file "
                f"(sent as {TOKEN_HEADER})"
            )
        if response.status_code == 405 and method != "GET":
            raise KongUnavailable(self._db_less(f"it answered {_kong_message(response)}"))
        return response

    def _db_less(self, evidence: str) -> str:
        return (
            f"Kong at {self.url} runs DB-less ({evidence}): the Admin API refuses writes; use "
            "kong.delivery: kubernetes with the Kong Ingress Controller, or load a declarative "
            "config"
        )

    def check_writable(self) -> None:
        response = self.request("GET", "/")
        if response.status_code != 200:
            raise KongUnavailable(
                f"the Kong Admin API at {self.url} answered GET / with {_kong_message(response)}"
            )
        try:
            database = response.json()["configuration"]["database"]
        except (ValueError, KeyError, TypeError):
            raise KongUnavailable(
                f"{self.url} does not look like a Kong Admin API (GET / has no "
                "configuration.database)"
            ) from None
        if database == "off":
            raise KongUnavailable(self._db_less("database=off"))

    def get(self, path: str) -> Entity | None:
        response = self.request("GET", path)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise KongRefused(f"GET {path}: {_kong_message(response)}")
        entity: Entity = response.json()
        return entity

    def write(self, method: str, path: str, body: Entity | None = None) -> None:
        response = self.request(method, path, body)
        if response.status_code not in (200, 201, 204) and not (
            method == "DELETE" and response.status_code == 404
        ):
            raise KongRefused(f"{method} {path}: {_kong_message(response)}")

    def list(self, path: str, params: Mapping[str, str] | None = None) -> list[Entity]:
        """Every page of a collection (Kong pages with ``offset``/``next``)."""
        items: list[Entity] = []
        query = dict(params or {})
        while True:
            response = self.request("GET", path, params=query)
            if response.status_code != 200:
                raise KongRefused(f"GET {path}: {_kong_message(response)}")
            page = response.json()
            items.extend(page.get("data") or [])
            if not page.get("next") or not page.get("offset"):
                return items
            query["offset"] = str(page["offset"])


_CERT_FIELDS = ("cert", "key", "cert_alt", "key_alt", "tags")
_CA_FIELDS = ("cert", "tags")


class _Pass:
    """One reconciliation: CA certificates, client certificates, Services, then retirements."""

    def __init__(self, admin: _Admin, report: PublishReport, last: dict[str, str]) -> None:
        self.admin = admin
        self.report = report
        self.last = last
        self._services: list[Entity] | None = None
        self._generation: Generation = UNKNOWN

    def run(self, desired: Desired) -> None:
        self._generation = desired.generation
        # Trust first, then the certificates, then what points at them, then removals.
        for ca_id, body in desired.ca_certificates.items():
            self._guarded(f"ca_certificate/{ca_id}", self._put_ca, ca_id, body)
        for cert_id, body in desired.certificates.items():
            self._guarded(f"certificate/{cert_id}", self._put_certificate, cert_id, body)
        for service, want in desired.services.items():
            needs = [f"certificate/{want.certificate}"]
            needs += [f"ca_certificate/{ca_id}" for ca_id in want.ca_certificates]
            if any(need in self.report.errors for need in needs):
                continue  # what it would point at is not in Kong as wanted; that error says why
            self._guarded(f"service/{service}", self._point_service, service, want)
        self._guarded("ca_certificates", self._retire_roots, set(desired.ca_certificates))
        self._guarded("certificates", self._retire_clients, set(desired.certificates))

    def _guarded(self, obj: str, action: Callable[..., None], *args: Any) -> None:
        try:
            action(*args)
        except KongRefused as exc:
            self.report.errors[obj] = str(exc)

    def _settle(
        self,
        obj: str,
        live: Mapping[str, Any] | None,
        want: Mapping[str, Any],
        *,
        known: bool = False,
    ) -> bool:
        """Note drift on ``obj`` and return whether it must be written.

        Drift is a live entity that is not what this process last wrote there (a rotation
        changes ``want``, not the live entity). When what the entity must hold is ``known``
        without that memory, any difference is drift, even on a first pass after a restart
        or a failover: an id derived from the content itself (a root's CA certificate), or
        an entity tagged with the very credential generation this pass would write.
        """
        if live == want:
            self.last[obj] = _digest(want)
            return False
        remembered = self.last.get(obj)
        if (remembered is not None and remembered != _digest(live)) or (known and live is not None):
            self.report.drifted.append(obj)
        return True

    def _wrote(self, obj: str, want: Mapping[str, Any]) -> None:
        self.last[obj] = _digest(want)
        self.report.changed.append(obj)

    def _put_ca(self, ca_id: str, body: Entity) -> None:
        obj = f"ca_certificate/{ca_id}"
        live = _comparable(self.admin.get(f"/ca_certificates/{ca_id}"), _CA_FIELDS)
        want = _comparable(body, _CA_FIELDS)
        assert want is not None
        if self._settle(obj, live, want, known=True):
            self.admin.write("PUT", f"/ca_certificates/{ca_id}", body)
            self._read_back(obj, f"/ca_certificates/{ca_id}", want, _CA_FIELDS)
            self._wrote(obj, want)

    def _put_certificate(self, cert_id: str, body: Entity) -> None:
        obj = f"certificate/{cert_id}"
        entity = self.admin.get(f"/certificates/{cert_id}")
        live = _comparable(entity, _CERT_FIELDS)
        want = _comparable(body, _CERT_FIELDS)
        assert want is not None
        theirs, ours = entity_generation(entity), entity_generation(body)
        # Written for this very credential (same epoch and record version): whatever
        # differs now was changed by someone else, whichever replica wrote it.
        same = ours != UNKNOWN and (theirs[0], theirs[2]) == (ours[0], ours[2])
        if self._settle(obj, live, want, known=same):
            if ours != UNKNOWN and theirs > ours:
                raise KongRefused(_newer(obj, theirs, ours, "overwriting"))
            self.admin.write("PUT", f"/certificates/{cert_id}", body)
            self._read_back(obj, f"/certificates/{cert_id}", want, _CERT_FIELDS)
            self._wrote(obj, want)

    def _read_back(
        self, obj: str, path: str, want: Mapping[str, Any], fields: Sequence[str]
    ) -> None:
        """What Kong holds at ``path`` after a write must be what was written."""
        held = _comparable(self.admin.get(path), fields)
        if held != want:
            # Names only: a value may be a key.
            differ = [f for f in fields if held is None or held.get(f) != want.get(f)]
            raise KongMismatch(
                f"{obj}: Kong accepted the write but holds something else "
                f"({', '.join(differ) if held is not None else 'nothing'} differ when read "
                "back); not published"
            )

    def _point_service(self, service: str, want: ServiceWant) -> None:
        obj = f"service/{service}"
        path = f"/services/{service}"
        live = self.admin.get(path)
        if live is None:
            raise KongRefused(
                f"Kong has no Service {service!r} (named as a client's service): create it, "
                "or fix kong.clients[].service"
            )
        body = want.body()
        target = _service_view(body, want)
        if not self._settle(obj, _service_view(live, want), target):
            return
        protocol = live.get("protocol")
        if protocol not in TLS_PROTOCOLS:
            raise KongRefused(
                f"Kong Service {service!r} uses protocol {protocol}; Kong sends a client "
                "certificate and verifies upstreams only over TLS, so the service must use "
                "protocol https (or tls)"
            )
        if want.ca_certificates:
            # What a Service trusts is fenced like an entity: a deposed leader must not
            # take a root off it. Its own tags are kept; the generation tag is ours.
            theirs = entity_generation(live)
            if self._generation != UNKNOWN and theirs[:2] > self._generation[:2]:
                raise KongRefused(_newer(obj, theirs, self._generation, "updating"))
            kept = [t for t in live.get("tags") or [] if not t.startswith(GENERATION_TAG_PREFIX)]
            body["tags"] = kept + _generation_tags(self._generation)
        self.admin.write("PATCH", path, body)
        held = self.admin.get(path)
        if held is None or _service_view(held, want) != target:
            view = _service_view(held or {}, want)
            differ = [f for f in target if view.get(f) != target[f]]
            raise KongMismatch(
                f"{obj}: Kong accepted the PATCH but holds something else ({', '.join(differ)} "
                "differ when read back); not published"
            )
        self._wrote(obj, target)

    def _all_services(self) -> list[Entity]:
        if self._services is None:
            self._services = self.admin.list("/services")
        return self._services

    def _ours(self, collection: str, extra_tag: str) -> list[Entity]:
        # Kong filters by tag, and the check is repeated here: never touch what is not ours.
        return [
            e
            for e in self.admin.list(f"/{collection}", {"tags": MANAGED_TAG})
            if MANAGED_TAG in (e.get("tags") or [])
            and any(t.startswith(extra_tag) for t in e.get("tags") or [])
        ]

    def _retire_roots(self, keep: set[str]) -> None:
        for entity in self._ours("ca_certificates", ROOT_TAG):
            ca_id = str(entity["id"])
            if ca_id in keep:
                continue
            users = [
                str(s.get("name") or s["id"])
                for s in self._all_services()
                if ca_id in (s.get("ca_certificates") or [])
            ]
            self._remove(
                f"ca_certificate/{ca_id}", f"/ca_certificates/{ca_id}", "root", users, entity
            )

    def _retire_clients(self, keep: set[str]) -> None:
        for entity in self._ours("certificates", CLIENT_TAG_PREFIX):
            cert_id = str(entity["id"])
            if cert_id in keep:
                continue
            users = [
                str(s.get("name") or s["id"])
                for s in self._all_services()
                if (s.get("client_certificate") or {}).get("id") == cert_id
            ]
            self._remove(
                f"certificate/{cert_id}", f"/certificates/{cert_id}", "client", users, entity
            )

    def _remove(
        self, obj: str, path: str, what: str, users: list[str], entity: Mapping[str, Any]
    ) -> None:
        theirs = entity_generation(entity)
        if self._generation != UNKNOWN and theirs[:2] > self._generation[:2]:
            self.report.errors[obj] = _newer(obj, theirs, self._generation, "deleting")
            return
        if users:
            # Deleting it would break those Services' upstream TLS; wait for them to move.
            field_name = "ca_certificates" if what == "root" else "client_certificate"
            self.report.errors[obj] = (
                f"retired {what} certificate kept: still referenced by Kong Service(s) "
                f"{', '.join(sorted(users))}; remove it from their {field_name} and it is "
                "deleted on the next pass"
            )
            return
        try:
            self.admin.write("DELETE", path)
        except KongRefused as exc:
            self.report.errors[obj] = str(exc)
            return
        self.last.pop(obj, None)
        self.report.changed.append(f"{obj} (deleted)")


def _newer(obj: str, theirs: Generation, ours: Generation, doing: str) -> str:
    return (
        f"{obj} was written from journal generation {format_generation(theirs)}, newer than "
        f"this pass's {format_generation(ours)} (another replica leads now?); not {doing} it. "
        f"If the journal was restored on purpose, remove its {GENERATION_TAG_PREFIX} tag"
    )
