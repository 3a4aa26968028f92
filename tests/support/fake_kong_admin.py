"""A stand-in Kong Admin API: a real HTTP server with Kong's entity rules, state in memory.

No Kong binary can run in this test environment (Kong needs OpenResty and a database), so
the publisher is tested against this instead. It is deliberately strict: it enforces the
rules in docs REFERENCE.md (Kong 3.x, kong/db/schema/entities/*.lua) that a client of the
Admin API can trip over, and answers errors in Kong's JSON shape
(``{"message", "name", "code"}``):

- Certificate: ``cert`` and ``key`` required, the key must match the first (leaf)
  certificate; ``PUT /certificates/{id}`` is an upsert that replaces every field.
- CA Certificate: exactly one PEM certificate, CA=true, not expired; cert unique.
- Service: ``client_certificate``, ``ca_certificates``, ``tls_verify`` and
  ``tls_verify_depth`` only when the protocol is https or tls; ``client_certificate``
  must reference an existing Certificate, which then cannot be deleted;
  ``ca_certificates`` is an array of UUIDs that Kong does not check against its CA
  Certificates (not a foreign key: kong/db/schema/entities/services.lua), ``tls_verify``
  a boolean.
- A CA Certificate a Service still lists cannot be deleted.
- ``Kong-Admin-Token`` is checked when a token is set (401 otherwise).
- DB-less mode: ``GET /`` reports ``database: off`` and every write answers 405.
- Collections page with ``size``/``offset`` and answer ``next``; ``tags`` filters.

What it does not model: SNIs, workspaces, RBAC permissions, plugins referencing CA
certificates, and Kong's exact wording of every message.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Entity = dict[str, Any]
COLLECTIONS = ("certificates", "ca_certificates", "services")
TLS_PROTOCOLS = ("https", "tls")
TLS_ONLY_SERVICE_FIELDS = (
    "client_certificate",
    "ca_certificates",
    "tls_verify",
    "tls_verify_depth",
)
# Kong's error codes (kong/db/errors.lua).
SCHEMA_VIOLATION = (2, "schema violation")
FOREIGN_KEY_VIOLATION = (4, "foreign key violation")
UNIQUE_VIOLATION = (5, "unique constraint violation")
REFERENCED_BY_OTHERS = (19, "referenced by others")


class KongError(Exception):
    def __init__(self, status: int, message: str, kind: tuple[int, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind

    def response(self) -> JSONResponse:
        body: Entity = {"message": self.message}
        if self.kind is not None:
            body["code"], body["name"] = self.kind
        return JSONResponse(body, status_code=self.status)


def _schema_violation(errors: dict[str, str]) -> KongError:
    detail = "; ".join(f"{k}: {v}" if k != "@entity" else v for k, v in errors.items())
    prefix = "schema violation" if len(errors) == 1 else f"{len(errors)} schema violations"
    return KongError(400, f"{prefix} ({detail})", SCHEMA_VIOLATION)


@dataclass
class KongStore:
    """What the fake Kong holds; tests read and edit it directly (no rules apply then)."""

    certificates: dict[str, Entity] = field(default_factory=dict)
    ca_certificates: dict[str, Entity] = field(default_factory=dict)
    services: dict[str, Entity] = field(default_factory=dict)
    token: str | None = None
    db_less: bool = False
    page_size: int = 100
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    requests: list[tuple[str, str]] = field(default_factory=list)
    # Lets a test make Kong (or a proxy in front of it) misbehave: called with
    # (method, path, body) before the rules; a KongError it returns is the answer.
    fault: Callable[[str, str, Entity], KongError | None] | None = None
    # Lets a test make a write that Kong answers as accepted store something else (a
    # proxy or plugin rewriting bodies, a lost write): called with (method, path, body);
    # the body it returns is stored, while the answer is made from the body sent.
    rewrite: Callable[[str, str, Entity], Entity | None] | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def writes(self) -> list[tuple[str, str]]:
        """Every write request received (method, path), whether or not Kong accepted it."""
        return [(m, p) for m, p in self.requests if m != "GET"]

    def add_service(self, name: str, protocol: str = "https", **fields: Any) -> Entity:
        service: Entity = {
            "id": str(uuid.uuid4()),
            "name": name,
            "protocol": protocol,
            "host": f"{name}.example.internal",
            "port": 443 if protocol in TLS_PROTOCOLS else 80,
            "path": None,
            "client_certificate": None,
            "ca_certificates": None,
            "tls_verify": None,
            "tls_verify_depth": None,
            "tags": None,
            "created_at": int(time.time()),
            "updated_at": int(time.time()),
        }
        service.update(fields)
        with self.lock:
            self.services[service["id"]] = service
        return service

    def service(self, name_or_id: str) -> Entity | None:
        with self.lock:
            if name_or_id in self.services:
                return self.services[name_or_id]
            return next((s for s in self.services.values() if s["name"] == name_or_id), None)

    def table(self, collection: str) -> dict[str, Entity]:
        tables: dict[str, dict[str, Entity]] = {
            "certificates": self.certificates,
            "ca_certificates": self.ca_certificates,
            "services": self.services,
        }
        return tables[collection]

    # --- Kong's rules -------------------------------------------------------------------------

    def check_certificate(self, entity: Entity) -> None:
        errors = {f: "required field missing" for f in ("cert", "key") if not entity.get(f)}
        if errors:
            raise _schema_violation(errors)
        try:
            leaf = x509.load_pem_x509_certificates(str(entity["cert"]).encode())[0]
        except ValueError:
            raise _schema_violation({"cert": "invalid certificate"}) from None
        try:
            key = serialization.load_pem_private_key(str(entity["key"]).encode(), None)
        except (ValueError, TypeError):
            raise _schema_violation({"key": "invalid key"}) from None
        if _spki(key.public_key()) != _spki(leaf.public_key()):
            raise _schema_violation({"@entity": "certificate does not match key"})

    def check_ca_certificate(self, entity: Entity, entity_id: str) -> None:
        pem = str(entity.get("cert") or "")
        if not pem:
            raise _schema_violation({"cert": "required field missing"})
        if pem.count("-----BEGIN CERTIFICATE-----") > 1:
            raise _schema_violation({"@entity": "please submit only one certificate at a time"})
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError:
            raise _schema_violation({"cert": "invalid certificate"}) from None
        if cert.not_valid_after_utc < self.clock():
            raise _schema_violation(
                {"@entity": 'certificate expired, "Not After" time is in the past'}
            )
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise _schema_violation(
                {
                    "@entity": "certificate does not appear to be a CA because it is "
                    'missing the "CA" basic constraint'
                }
            )
        digest = cert.fingerprint(hashes.SHA256()).hex()
        for other_id, other in self.ca_certificates.items():
            if other_id != entity_id and other.get("cert_digest") == digest:
                raise KongError(
                    409,
                    f"UNIQUE violation detected on '{{cert_digest=\"{digest}\"}}'",
                    UNIQUE_VIOLATION,
                )
        entity["cert_digest"] = digest

    def check_service(self, entity: Entity) -> None:
        if entity.get("protocol") not in TLS_PROTOCOLS:
            not_null = {
                f: "value must be null"
                for f in TLS_ONLY_SERVICE_FIELDS
                if entity.get(f) not in (None, [])
            }
            if not_null:
                raise _schema_violation(not_null)
        errors: dict[str, str] = {}
        cas = entity.get("ca_certificates")
        if cas is not None and (
            not isinstance(cas, list)
            or any(not isinstance(c, str) or not _valid_uuid(c) for c in cas)
        ):
            errors["ca_certificates"] = "expected an array of valid UUIDs"
        if entity.get("tls_verify") is not None and not isinstance(entity["tls_verify"], bool):
            errors["tls_verify"] = "expected a boolean"
        if errors:
            raise _schema_violation(errors)
        ref = entity.get("client_certificate")
        if ref is not None:
            if not isinstance(ref, dict) or "id" not in ref:
                raise _schema_violation({"client_certificate": "expected a record"})
            if ref["id"] not in self.certificates:
                raise KongError(
                    400,
                    f"the foreign key '{{id=\"{ref['id']}\"}}' does not reference an existing "
                    "'certificates' entity.",
                    FOREIGN_KEY_VIOLATION,
                )

    def check_delete(self, collection: str, entity_id: str) -> None:
        for service in self.services.values():
            if collection == "ca_certificates" and entity_id in (service["ca_certificates"] or []):
                raise KongError(
                    400,
                    f"ca certificate {entity_id} is still referenced by services "
                    f"(id = {service['id']})",
                    REFERENCED_BY_OTHERS,
                )
            client_cert = service["client_certificate"] or {}
            if collection == "certificates" and client_cert.get("id") == entity_id:
                raise KongError(
                    400,
                    "an existing 'services' entity references this 'certificates' entity",
                    FOREIGN_KEY_VIOLATION,
                )


def _spki(public_key: Any) -> bytes:
    return bytes(
        public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _valid_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# --- the HTTP side ----------------------------------------------------------------------------


def build_app(store: KongStore) -> Starlette:
    async def endpoint(request: Request) -> Response:
        with store.lock:
            store.requests.append((request.method, request.url.path))
        if store.token is not None and request.headers.get("Kong-Admin-Token") != store.token:
            return JSONResponse(
                {"message": "Invalid credentials. Token or User credentials required"},
                status_code=401,
            )
        collection = request.path_params.get("collection")
        if collection is not None and collection not in COLLECTIONS:
            return JSONResponse({"message": "Not found"}, status_code=404)
        if store.db_less and request.method != "GET":
            verb = "delete" if request.method == "DELETE" else "create or update"
            return KongError(
                405,
                f"cannot {verb} '{collection}' entities when not using a database",
                (12, "operation unsupported"),
            ).response()
        body: Entity = {}
        if request.method in ("PUT", "PATCH"):
            try:
                body = await request.json()
            except ValueError:
                body = None  # type: ignore[assignment]
            if not isinstance(body, dict):
                return KongError(400, "Cannot parse JSON body").response()
        key = request.path_params.get("key")
        if store.fault is not None:
            injected = store.fault(request.method, request.url.path, body)
            if injected is not None:
                return injected.response()
        try:
            with store.lock:
                if collection is None:
                    return _root()
                if key is None:
                    return _list(collection, request)
                handler = {
                    "GET": _get,
                    "PUT": _put,
                    "PATCH": _patch,
                    "DELETE": _delete,
                }[request.method]
                return handler(collection, key, body)
        except KongError as exc:
            return exc.response()

    def _root() -> Response:
        database = "off" if store.db_less else "postgres"
        return JSONResponse(
            {
                "tagline": "Welcome to kong",
                "version": "3.9.0 (ca-daemon test stand-in)",
                "configuration": {"database": database},
            }
        )

    def _list(collection: str, request: Request) -> Response:
        tags = [t for t in request.query_params.get("tags", "").split(",") if t]
        size = int(request.query_params.get("size", store.page_size))
        items = sorted(store.table(collection).values(), key=lambda e: str(e["id"]))
        if tags:
            items = [e for e in items if set(tags) <= set(e.get("tags") or [])]
        start = int(request.query_params.get("offset", "0"))
        more = start + size < len(items)
        next_offset = str(start + size) if more else None
        query = f"&tags={','.join(tags)}" if tags else ""
        return JSONResponse(
            {
                "data": items[start : start + size],
                "offset": next_offset,
                "next": f"/{collection}?offset={next_offset}{query}" if more else None,
            }
        )

    def _find(collection: str, key: str) -> Entity | None:
        if collection == "services":
            return store.service(key)
        return store.table(collection).get(key)

    def _get(collection: str, key: str, body: Entity) -> Response:
        entity = _find(collection, key)
        if entity is None:
            return JSONResponse({"message": "Not found"}, status_code=404)
        return JSONResponse(entity)

    def _put(collection: str, key: str, body: Entity) -> Response:
        existing = _find(collection, key)
        if existing is not None:
            entity_id = str(existing["id"])
        elif _valid_uuid(key):
            entity_id = key
        else:
            raise KongError(400, f"invalid primary key '{key}'", (1, "invalid primary key"))
        # PUT replaces: every field not sent goes back to its default.
        entity = _defaults(collection, entity_id, existing)
        entity.update(body)
        entity["id"] = entity_id
        _validate(collection, entity, entity_id)
        answer = dict(entity)
        stored = _rewritten("PUT", collection, key, body)
        if stored is not None:
            entity = {**_defaults(collection, entity_id, existing), **stored, "id": entity_id}
        if existing is not None:
            existing.clear()
            existing.update(entity)
        else:
            store.table(collection)[entity_id] = entity
        return JSONResponse(answer)

    def _patch(collection: str, key: str, body: Entity) -> Response:
        existing = _find(collection, key)
        if existing is None:
            return JSONResponse({"message": "Not found"}, status_code=404)
        entity = {**existing, **body, "id": existing["id"]}
        _validate(collection, entity, str(existing["id"]))
        answer = dict(entity)
        stored = _rewritten("PATCH", collection, key, body)
        if stored is not None:
            entity = {**existing, **stored, "id": existing["id"]}
        existing.update(entity)  # in place: tests may hold the entity they created
        return JSONResponse(answer)

    def _rewritten(method: str, collection: str, key: str, body: Entity) -> Entity | None:
        if store.rewrite is None:
            return None
        return store.rewrite(method, f"/{collection}/{key}", dict(body))

    def _delete(collection: str, key: str, body: Entity) -> Response:
        existing = _find(collection, key)
        if existing is not None:
            store.check_delete(collection, str(existing["id"]))
            del store.table(collection)[str(existing["id"])]
        return Response(status_code=204)

    def _defaults(collection: str, entity_id: str, existing: Entity | None) -> Entity:
        created = existing["created_at"] if existing else int(time.time())
        if collection == "certificates":
            return {
                "id": entity_id,
                "created_at": created,
                "cert": None,
                "key": None,
                "cert_alt": None,
                "key_alt": None,
                "tags": None,
                "snis": [],
            }
        if collection == "ca_certificates":
            return {"id": entity_id, "created_at": created, "cert": None, "tags": None}
        raise KongError(405, "the stand-in creates Services only through KongStore.add_service")

    def _validate(collection: str, entity: Entity, entity_id: str) -> None:
        tags = entity.get("tags")
        if tags is not None and (
            not isinstance(tags, list)
            or any(not isinstance(t, str) or "," in t or "/" in t for t in tags)
        ):
            raise _schema_violation({"tags": "invalid tag: commas and slashes are not allowed"})
        if collection == "certificates":
            store.check_certificate(entity)
        elif collection == "ca_certificates":
            store.check_ca_certificate(entity, entity_id)
        else:
            store.check_service(entity)

    methods = ["GET", "PUT", "PATCH", "DELETE"]
    return Starlette(
        routes=[
            Route("/", endpoint, methods=["GET"]),
            Route("/{collection}", endpoint, methods=["GET"]),
            Route("/{collection}/{key}", endpoint, methods=methods),
        ]
    )


@dataclass
class FakeKong:
    url: str
    store: KongStore


@contextmanager
def serve(
    store: KongStore | None = None, tls: tuple[Path, Path] | None = None, port: int = 0
) -> Iterator[FakeKong]:
    """Serve a fake Kong Admin API on a free loopback port for the duration of the block.

    ``tls`` is (certificate file, key file) to serve HTTPS, as a production Admin API does.
    ``port`` (with the same ``store``) brings a stopped stand-in back where it was, as a
    restarted Kong comes back on its address with its database intact.
    """
    store = store or KongStore()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    certfile, keyfile = tls if tls else (None, None)
    config = uvicorn.Config(
        build_app(store),
        log_level="warning",
        lifespan="off",
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fake Kong Admin API did not start")
        time.sleep(0.01)
    try:
        yield FakeKong(url=f"{'https' if tls else 'http'}://127.0.0.1:{port}", store=store)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
