"""The only place configuration is read.

Precedence, highest first: CLI flags > ``CA_DAEMON_*`` environment (nested keys
joined by ``__``) > the YAML file (``--config`` or ``CA_DAEMON_CONFIG``) > defaults.
With no file at all the packaged embedded default stands in for the YAML layer.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import unicodedata
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from ca_daemon.errors import ConfigError
from ca_daemon.util.durations import format_duration, parse_duration

ENV_PREFIX = "CA_DAEMON_"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
CONFIG_ENV = "CA_DAEMON_CONFIG"
# CA_DAEMON_* variables that are not configuration: the file's path, and the test suite's.
NOT_CONFIG_ENV = frozenset({CONFIG_ENV, "CA_DAEMON_REQUIRE_ALL", "CA_DAEMON_TESTENV"})
# X.509 (RFC 5280, ub-common-name) allows a common name of at most 64 characters.
MAX_COMMON_NAME = 64


class RuleError(ConfigError, ValueError):
    """Broken rules found by a model validator, each at a field path below that model.

    ``describe_validation_error`` prints one line per rule, so that a rule spanning
    fields (or sections) still names the exact field, e.g. ``kong.clients[0].rotate_before``.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {rule}" for path, rule in problems))
        self.problems = problems


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


def _dns_label(value: str) -> str:
    if len(value) > MAX_LABEL or not _DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a DNS label (at most {MAX_LABEL} lowercase letters, digits "
            "and '-', starting and ending with a letter or digit)"
        )
    return value


def _dns_subdomain(value: str) -> str:
    if len(value) > MAX_SUBDOMAIN or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid Kubernetes object name (at most {MAX_SUBDOMAIN} "
            "characters: DNS labels of lowercase letters, digits and '-' joined by '.')"
        )
    return value


def _service_name(value: str) -> str:
    if len(value) > MAX_LABEL or not _DNS1035_LABEL.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes Service name (at most {MAX_LABEL} lowercase "
            "letters, digits and '-', starting with a letter)"
        )
    return value


def _configmap_key(value: str) -> str:
    if (
        len(value) > MAX_SUBDOMAIN
        or not _CONFIGMAP_KEY.fullmatch(value)
        or value.startswith("..")
        or value == "."
    ):
        raise ValueError(
            f"{value!r} is not a ConfigMap key (at most {MAX_SUBDOMAIN} letters, digits, "
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
        raise ValueError(f"{value!r} is an IP address, not a DNS name (IP SANs are not supported)")
    labels = value.removeprefix("*.").split(".")
    if len(value) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"{value!r} is not a DNS hostname (dot-separated labels of letters, digits and '-')"
        )
    return value


# A SAN uniformResourceIdentifier: scheme ':' and more, printable ASCII, no spaces.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[!-~]+")


def _uri(value: str) -> str:
    if not _URI.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a URI (scheme:rest in printable ASCII without spaces, "
            "e.g. spiffe://cluster.local/ns/kong/sa/kong)"
        )
    return value


CommonName = Annotated[str, AfterValidator(_common_name)]
DnsName = Annotated[str, AfterValidator(_dns_name)]
Uri = Annotated[str, AfterValidator(_uri)]

DnsLabel = Annotated[str, BeforeValidator(lambda v: _dns_label(v) if isinstance(v, str) else v)]
ObjectName = Annotated[
    str, BeforeValidator(lambda v: _dns_subdomain(v) if isinstance(v, str) else v)
]


class Section(BaseModel):
    """Every section refuses keys it does not know: a typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


KeyType = Literal["ec-p256", "rsa-2048", "rsa-4096"]


class LocalAnchor(Section):
    dir: Path = Path("./ca-daemon-data")
    passphrase_file: Path | None = None

    @property
    def effective_passphrase_file(self) -> Path:
        return self.passphrase_file or self.dir / "passphrase"


class VaultAuth(Section):
    method: Literal["token", "kubernetes", "approle"] = "token"
    token: SecretStr | None = None
    token_file: Path | None = None
    role: str | None = None
    mount: str | None = None
    jwt_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    role_id: str | None = None
    secret_id_file: Path | None = None

    @field_validator("token")
    @classmethod
    def _header_safe(cls, value: SecretStr | None) -> SecretStr | None:
        # Sent as the X-Vault-Token header. Never echo the value: it is a secret.
        if value is not None and not re.fullmatch(r"[!-~]+", value.get_secret_value()):
            raise ValueError("must be non-empty printable ASCII without spaces (value not shown)")
        return value

    @model_validator(mode="after")
    def _method_needs(self) -> VaultAuth:
        if self.method == "kubernetes" and not self.role:
            raise ValueError("method kubernetes needs 'role'")
        if self.method == "approle" and not (self.role_id and self.secret_id_file):
            raise ValueError("method approle needs 'role_id' and 'secret_id_file'")
        return self


class VaultAnchor(Section):
    address: str = "http://127.0.0.1:8200"
    auth: VaultAuth = VaultAuth()
    ca_cert: Path | None = None
    namespace: str | None = None
    root_mount: str = "pki-root"
    kong_mount: str = "pki-kong"
    kv_mount: str = "secret"
    state_path: str = "ca-daemon/state"
    create_if_missing: bool = True
    timeout: Duration = timedelta(seconds=10)
    # Client-side limit on requests to Vault (token bucket, as client-go's QPS/Burst);
    # 0: none beyond rotation.concurrency in flight.
    qps: float = Field(default=0, ge=0)
    burst: int = Field(default=20, ge=1)

    @field_validator("address")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class AnchorConfig(Section):
    backend: Literal["local", "vault"] = "local"
    local: LocalAnchor = LocalAnchor()
    vault: VaultAnchor = VaultAnchor()


def _check_renewal(lifetime: timedelta, rotate_before: timedelta) -> None:
    if lifetime <= timedelta(0):
        raise RuleError([("lifetime", "must be positive")])
    if not timedelta(0) < rotate_before < lifetime:
        raise RuleError([("rotate_before", "must be positive and shorter than lifetime")])


class RootConfig(Section):
    common_name: CommonName | None = None
    key: KeyType = "ec-p256"
    lifetime: Duration = timedelta(hours=8760)
    rotate_before: Duration = timedelta(hours=2920)

    @model_validator(mode="after")
    def _rotate_before_fits(self) -> RootConfig:
        _check_renewal(self.lifetime, self.rotate_before)
        return self


class Renewal(Section):
    lifetime: Duration
    rotate_before: Duration

    @model_validator(mode="after")
    def _rotate_before_fits(self) -> Renewal:
        _check_renewal(self.lifetime, self.rotate_before)
        return self


class LinkerdIssuer(Renewal):
    lifetime: Duration = timedelta(hours=48)
    rotate_before: Duration = timedelta(hours=16)


class LinkerdConfig(Section):
    enabled: bool = True
    namespace: DnsLabel = "linkerd"
    restart: Literal["none", "control-plane", "all"] = "control-plane"
    gate: Literal["time", "pods"] = "pods"
    issuer: LinkerdIssuer = LinkerdIssuer()
    issuer_secret: ObjectName = "linkerd-identity-issuer"
    trust_roots_configmap: ObjectName = "linkerd-identity-trust-roots"


class KongIntermediate(Renewal):
    lifetime: Duration = timedelta(hours=2160)
    rotate_before: Duration = timedelta(hours=720)


class KongClient(Renewal):
    name: DnsLabel
    common_name: CommonName
    dns_names: list[DnsName] = Field(default_factory=list)
    uris: list[Uri] = Field(default_factory=list)
    lifetime: Duration = timedelta(hours=720)
    rotate_before: Duration = timedelta(hours=240)
    secret: ObjectName | None = None
    service: str | None = None

    @field_validator("service")
    @classmethod
    def _namespaced_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.count("/") > 1:
            raise ValueError("must be 'namespace/name' or 'name'")
        for part in value.split("/"):
            _dns_label(part)
        return value

    @property
    def secret_name(self) -> str:
        return self.secret or f"kong-upstream-{self.name}"


class KongAdminApi(Section):
    url: str | None = None
    token_file: Path | None = None
    ca_cert: Path | None = None


class KongConfig(Section):
    enabled: bool = True
    delivery: Literal["kubernetes", "admin-api"] = "kubernetes"
    namespace: DnsLabel = "kong"
    intermediate: KongIntermediate = KongIntermediate()
    clients: list[KongClient] = Field(default_factory=list)
    admin_api: KongAdminApi = KongAdminApi()

    @field_validator("clients")
    @classmethod
    def _unique_names(cls, clients: list[KongClient]) -> list[KongClient]:
        names = [c.name for c in clients]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"client names must be unique; repeated: {', '.join(dupes)}")
        # A Service presents one client certificate: two clients on it would flap.
        services = [c.service for c in clients if c.service]
        shared = sorted({s for s in services if services.count(s) > 1})
        if shared:
            raise ValueError(f"each service takes one client; shared: {', '.join(shared)}")
        return clients

    @model_validator(mode="after")
    def _admin_api_needs_url(self) -> KongConfig:
        if self.enabled and self.delivery == "admin-api":
            if not self.admin_api.url:
                raise ValueError("delivery admin-api needs admin_api.url")
            # Through the Admin API a client's service is a Kong Service name or id.
            namespaced = [c.name for c in self.clients if c.service and "/" in c.service]
            if namespaced:
                raise ValueError(
                    "with delivery admin-api, clients' service is a Kong Service name, "
                    f"not namespace/name: {', '.join(namespaced)}"
                )
        if self.enabled and self.delivery == "kubernetes":
            # A Kubernetes Service name is stricter than a namespace (it starts with a
            # letter): a name no Service can have would fail its annotation every pass.
            problems = []
            for i, client in enumerate(self.clients):
                if client.service is None:
                    continue
                try:
                    _service_name(client.service.rpartition("/")[2])
                except ValueError as exc:
                    problems.append((f"clients[{i}].service", str(exc)))
            if problems:
                raise RuleError(problems)
        return self


class BundleTarget(Section):
    namespace: DnsLabel
    configmap: ObjectName
    key: Annotated[str, AfterValidator(_configmap_key)] = "ca-bundle.crt"


class RotationConfig(Section):
    check_interval: Duration = timedelta(seconds=60)
    propagation_delay: Duration = timedelta(minutes=10)
    retire_delay: Duration | Literal["auto"] = "auto"
    clock_skew: Duration = timedelta(minutes=5)
    jitter: float = Field(default=0.05, ge=0.0, le=0.5)
    # Renewals of many credentials run in parallel batches of this size; the anchor
    # (Vault) does the signing, so a small pod is not the bottleneck.
    concurrency: int = Field(default=8, ge=1, le=64)

    @field_validator("check_interval")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be positive")
        return value


class PublishKubernetes(Section):
    enabled: bool | None = None  # None: auto (in-cluster or KUBECONFIG)
    # Writes (create/replace/patch) in flight toward the apiserver at once.
    concurrency: int = Field(default=8, ge=1, le=64)
    # Client-side limit on requests to the apiserver (client-go's QPS/Burst semantics);
    # 0: none beyond the concurrency (the apiserver's Priority and Fairness still applies).
    qps: float = Field(default=0, ge=0)
    burst: int = Field(default=20, ge=1)


class PublishConfig(Section):
    directory: Path | None = None
    kubernetes: PublishKubernetes = PublishKubernetes()


class ServerSar(Section):
    group: str = "ca-daemon.io"
    resource: str = "rotations"
    verb: str = "create"


class ServerConfig(Section):
    address: str = "127.0.0.1:8080"
    auth: Literal["static", "kubernetes"] = "static"
    token_file: Path | None = None
    sar: ServerSar = ServerSar()

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port, e.g. 127.0.0.1:8080")
        return value


class LeaderElection(Section):
    enabled: bool | None = None  # None: on when publishing to Kubernetes
    # The daemon's own namespace (Lease, SubjectAccessReview, Events); None: in-cluster
    # ServiceAccount's namespace, else POD_NAMESPACE, else ca-daemon.
    namespace: DnsLabel | None = None
    lease: ObjectName = "ca-daemon"
    lease_duration: Duration = timedelta(seconds=15)
    renew_deadline: Duration = timedelta(seconds=10)
    retry_period: Duration = timedelta(seconds=2)


_yaml_layer: ContextVar[Mapping[str, Any] | None] = ContextVar("_yaml_layer", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    trust_domain: str = "cluster.local"
    anchor: AnchorConfig = AnchorConfig()
    root: RootConfig = RootConfig()
    linkerd: LinkerdConfig = LinkerdConfig()
    kong: KongConfig = KongConfig()
    bundles: list[BundleTarget] = Field(default_factory=list)
    rotation: RotationConfig = RotationConfig()
    publish: PublishConfig = PublishConfig()
    server: ServerConfig = ServerConfig()
    leader_election: LeaderElection = LeaderElection()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_source = InitSettingsSource(settings_cls, dict(_yaml_layer.get() or {}))
        return (init_settings, env_settings, yaml_source)

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        return _dns_subdomain(value)

    @model_validator(mode="after")
    def _fits_rotation_and_x509(self) -> Settings:
        problems = [*self._renewal_margins(), *self._derived_name_lengths()]
        if problems:
            raise RuleError(problems)
        return self

    def _renewals(self) -> Iterator[tuple[str, timedelta, timedelta]]:
        yield "root", self.root.lifetime, self.root.rotate_before
        yield "linkerd.issuer", self.linkerd.issuer.lifetime, self.linkerd.issuer.rotate_before
        intermediate = self.kong.intermediate
        yield "kong.intermediate", intermediate.lifetime, intermediate.rotate_before
        for i, client in enumerate(self.kong.clients):
            yield f"kong.clients[{i}]", client.lifetime, client.rotate_before

    def _renewal_margins(self) -> Iterator[tuple[str, str]]:
        # A certificate is due at not_after - rotate_before * (1 + jitter * spread), spread
        # in [0, 1]. not_after is now + lifetime (clock_skew only backdates not_before),
        # so a new certificate is due at once unless the longest stretch stays below
        # lifetime; then it would be reissued on every pass.
        jitter = self.rotation.jitter
        for path, lifetime, rotate_before in self._renewals():
            stretched = rotate_before * (1 + jitter)
            if stretched >= lifetime:
                yield (
                    f"{path}.rotate_before",
                    f"rotate_before * (1 + rotation.jitter) = {format_duration(stretched)} "
                    f"must be shorter than lifetime {format_duration(lifetime)}, "
                    "or every new certificate is due for renewal at once",
                )

    def _derived_name_lengths(self) -> Iterator[tuple[str, str]]:
        derived = []
        if self.root.common_name is None:
            derived.append(("the root's common name", self.root_common_name))
        if self.linkerd.enabled:
            derived.append(("the Linkerd issuer's common name", self.linkerd_issuer_common_name))
        if self.kong.enabled:
            derived.append(
                ("the Kong intermediate's common name", self.kong_intermediate_common_name)
            )
        for what, name in derived:
            if len(name) > MAX_COMMON_NAME:
                yield (
                    "trust_domain",
                    f"too long: {what} {name} would be {len(name)} characters, "
                    f"X.509 allows {MAX_COMMON_NAME}",
                )

    # Derived defaults: computed, never stored, so they follow the fields they depend on.

    @property
    def root_common_name(self) -> str:
        return self.root.common_name or f"root.linkerd.{self.trust_domain}"

    @property
    def linkerd_issuer_common_name(self) -> str:
        return f"identity.{self.linkerd.namespace}.{self.trust_domain}"

    @property
    def kong_intermediate_common_name(self) -> str:
        return f"kong-upstream.{self.trust_domain}"

    @property
    def publish_directory(self) -> Path:
        return self.publish.directory or self.anchor.local.dir / "out"

    @property
    def leader_election_enabled(self) -> bool:
        """``leader_election.enabled``; unset: on when publishing to Kubernetes."""
        enabled = self.leader_election.enabled
        return self.kubernetes_enabled if enabled is None else enabled

    @property
    def daemon_namespace(self) -> str:
        """Where the daemon's Lease, SubjectAccessReview and Events live (SPEC order)."""
        if self.leader_election.namespace:
            return self.leader_election.namespace
        try:
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "ca-daemon"
        except OSError:
            return os.environ.get("POD_NAMESPACE") or "ca-daemon"

    @property
    def kubernetes_enabled(self) -> bool:
        if self.publish.kubernetes.enabled is not None:
            return self.publish.kubernetes.enabled
        in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        return in_cluster or bool(os.environ.get("KUBECONFIG"))

    @property
    def api_token_file(self) -> Path:
        return self.server.token_file or self.anchor.local.dir / "api-token"


def embedded_default() -> dict[str, Any]:
    text = resources.files("ca_daemon.config").joinpath("default.yaml").read_text()
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without the quoted snippet of the file: it may hold a secret."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc)
    what = "; ".join(part for part in (exc.context, exc.problem) if part) or "syntax error"
    mark = exc.problem_mark or exc.context_mark
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark else what


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); expected UTF-8 YAML text"
        ) from None
    if "\0" in text:
        raise ConfigError(
            f"config file {path}: binary content (NUL byte at offset {raw.index(0)}); "
            "expected UTF-8 YAML text"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: not valid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    odd = [repr(key) for key in data if not isinstance(key, str)]
    if odd:
        raise ConfigError(f"config file {path}: {', '.join(odd)}: unknown key (not a section name)")
    return data


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        # Pydantic tags union members and validators into loc; drop those for a plain path.
        loc = tuple(
            p
            for p in error["loc"]
            if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))
        )
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, RuleError):
            for path, rule in cause.problems:
                lines.append(f"{_field_path((*loc, path))}: {rule}")
            continue
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{_field_path(loc)}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(dict.fromkeys(lines))


def _environment_problems(environ: Mapping[str, str]) -> list[str]:
    """CA_DAEMON_* variables that name no field, or whose JSON value does not parse.

    A misspelt variable is an error like an unknown YAML key, never silently ignored.
    Names are matched without regard to case, as pydantic-settings does.
    """
    problems = []
    for name, value in sorted(environ.items()):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_CONFIG_ENV:
            continue
        model: type[BaseModel] | None = Settings
        takes_json = False
        path = ""
        for key in upper.removeprefix(ENV_PREFIX).lower().split("__"):
            field = model.model_fields.get(key) if model is not None else None
            if field is None:
                where = f"in {path}" if path else "at the top level"
                problems.append(
                    f"{name}: unknown setting ({key!r} is not a configuration key {where}; "
                    f"variables are {ENV_PREFIX} + the key path joined by '__')"
                )
                break
            path = f"{path}.{key}" if path else key
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                model, takes_json = annotation, True
            else:
                model, takes_json = None, get_origin(annotation) in (list, dict)
        else:
            # pydantic-settings decodes sections and lists as JSON; say which variable failed.
            if takes_json:
                try:
                    json.loads(value)
                except ValueError as exc:
                    problems.append(f"{name}: {path} takes a JSON value, and this is not: {exc}")
    return problems


def load_settings(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Load configuration from every layer; raise ConfigError naming each bad field."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    env_problems = _environment_problems(os.environ)
    if env_problems:
        raise ConfigError("invalid environment:\n  " + "\n  ".join(env_problems))
    yaml_layer = _read_yaml(path) if path is not None else embedded_default()
    token = _yaml_layer.set(yaml_layer)
    try:
        return Settings(**dict(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    except SettingsError as exc:  # the checks above should leave nothing for this
        raise ConfigError(f"invalid environment: {exc}: {exc.__cause__}") from None
    finally:
        _yaml_layer.reset(token)


def effective_config(settings: Settings) -> dict[str, Any]:
    """The configuration as it is in force, secrets redacted, ready to print as YAML."""
    data = settings.model_dump(mode="json")
    data["root"]["common_name"] = settings.root_common_name
    data["publish"]["directory"] = str(settings.publish_directory)
    data["publish"]["kubernetes"]["enabled"] = settings.kubernetes_enabled
    data["server"]["token_file"] = str(settings.api_token_file)
    data["anchor"]["local"]["passphrase_file"] = str(
        settings.anchor.local.effective_passphrase_file
    )
    if data["leader_election"]["enabled"] is None:
        data["leader_election"]["enabled"] = settings.kubernetes_enabled
    for client, model in zip(data["kong"]["clients"], settings.kong.clients, strict=True):
        client["secret"] = model.secret_name
    return data
