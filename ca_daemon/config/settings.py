"""The configuration model: every section, its defaults and its rules (config/loading.py
reads it from its layers; config/names.py holds the accepted names and durations)."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ca_daemon.config.names import (
    MAX_COMMON_NAME,
    CommonName,
    DnsLabel,
    DnsName,
    Duration,
    ObjectName,
    Uri,
    check_configmap_key,
    check_dns_label,
    check_dns_subdomain,
    check_not_kong_ca_name,
    check_service_name,
)
from ca_daemon.config.service_links import is_service_link
from ca_daemon.errors import ConfigError
from ca_daemon.pki.crl import CRL_FILE
from ca_daemon.util.durations import format_duration

ENV_PREFIX = "CA_DAEMON_"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
CONFIG_ENV = "CA_DAEMON_CONFIG"
# CA_DAEMON_* variables that are not configuration: the file's path, and the test suite's.
HOME = "home"  # the one cluster's name when none are listed
NOT_CONFIG_ENV = frozenset({CONFIG_ENV, "CA_DAEMON_REQUIRE_ALL", "CA_DAEMON_TESTENV"})


class RuleError(ConfigError, ValueError):
    """Broken rules found by a model validator, each at a field path below that model.

    ``describe_validation_error`` prints one line per rule, so that a rule spanning
    fields (or sections) still names the exact field, e.g. ``kong.clients[0].rotate_before``.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {rule}" for path, rule in problems))
        self.problems = problems


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
        if "@" in value.split("://", 1)[1].split("/", 1)[0]:
            # Never echoed: what is before the @ is a password more often than not.
            raise ValueError(
                "must not carry credentials (user:password@); Vault authenticates with "
                "anchor.vault.auth"
            )
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
    # An emergency root rotation rolls only what ``restart`` says ("as-restart": the
    # operator rolls the rest, the gate names the Pods), or every meshed workload ("all":
    # RBAC then grants patching Deployments, StatefulSets and DaemonSets cluster-wide).
    emergency_restart: Literal["all", "as-restart"] = "as-restart"
    issuer: LinkerdIssuer = LinkerdIssuer()
    issuer_secret: ObjectName = "linkerd-identity-issuer"
    trust_roots_configmap: ObjectName = "linkerd-identity-trust-roots"
    # Linkerd's identity controller says, with an Event on its Deployment, whether it
    # loaded each new issuer; a root rotation retires the old root only once it loaded
    # one under the new root. "none": no identity controller reads this issuer Secret.
    confirm: Literal["events", "none"] = "events"
    # An issuer with no answer for this long is reported (metric, alert, Warning Event).
    confirm_timeout: Duration = timedelta(minutes=10)


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
    # Kong verifies the upstream's server certificate against the trusted roots.
    verify_upstream: bool = False

    @field_validator("service")
    @classmethod
    def _namespaced_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.count("/") > 1:
            raise ValueError("must be 'namespace/name' or 'name'")
        for part in value.split("/"):
            check_dns_label(part)
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
    # kubernetes.io/ingress.class on the Kong CA Secrets (KIC 3.0-3.3 ingest only those
    # of their own class): KIC compares it with its --ingress-class, an IngressClass's
    # object name.
    ingress_class: Annotated[str, AfterValidator(check_dns_subdomain)] = "kong"

    @field_validator("clients")
    @classmethod
    def _unique_names(cls, clients: list[KongClient]) -> list[KongClient]:
        # Counted once, not per client: list.count() per client was quadratic (0.6 s of a
        # 5,000-client configuration's validation).
        dupes = sorted(n for n, k in Counter(c.name for c in clients).items() if k > 1)
        if dupes:
            raise ValueError(f"client names must be unique; repeated: {', '.join(dupes)}")
        # A Service presents one client certificate: two clients on it would flap.
        services = Counter(c.service for c in clients if c.service)
        shared = sorted(s for s, k in services.items() if k > 1)
        if shared:
            raise ValueError(f"each service takes one client; shared: {', '.join(shared)}")
        problems = []
        for i, client in enumerate(clients):
            if client.verify_upstream and not client.service:
                problems.append(
                    (
                        f"[{i}].verify_upstream",
                        "needs service: only a Service can be told to verify its upstream",
                    )
                )
            try:
                check_not_kong_ca_name(client.secret_name)
            except ValueError as exc:
                problems.append((f"[{i}].secret", str(exc)))
        if problems:
            raise RuleError(problems)
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
                    check_service_name(client.service.rpartition("/")[2])
                except ValueError as exc:
                    problems.append((f"clients[{i}].service", str(exc)))
            if problems:
                raise RuleError(problems)
        return self


class BundleTarget(Section):
    namespace: DnsLabel
    configmap: ObjectName
    key: Annotated[str, AfterValidator(check_configmap_key)] = "ca-bundle.crt"

    @field_validator("key")
    @classmethod
    def _not_the_crls(cls, value: str) -> str:
        if value == CRL_FILE:
            raise ValueError(
                f"{CRL_FILE} is taken: the CRLs go there once a Kong client is revoked"
            )
        return value


class ClusterConfig(Section):
    """One cluster served from the shared root: how to reach it, and what it runs.

    The first is home (the Lease lives there); its ``linkerd``, ``kong`` and ``bundles``
    are the top-level sections (either place, not both). Each linked cluster gets its own
    Linkerd issuer (its own key) under the shared root."""

    name: DnsLabel
    in_cluster: bool = False
    kubeconfig: Path | None = None
    context: str | None = None
    # false: this cluster neither holds nor confirms a root rotation (published to, best
    # effort); status says so. Only explicit: an unreachable cluster always holds.
    in_rotation: bool = True
    linkerd: LinkerdConfig | None = None
    kong: KongConfig | None = None
    bundles: list[BundleTarget] | None = None

    @model_validator(mode="after")
    def _one_way_in(self) -> ClusterConfig:
        if self.in_cluster and self.kubeconfig is not None:
            raise ValueError("in_cluster and kubeconfig exclude each other: give one")
        if self.context is not None and self.kubeconfig is None:
            raise RuleError([("context", "needs kubeconfig: a context names one of its entries")])
        return self


class RotationConfig(Section):
    check_interval: Duration = timedelta(seconds=60)
    propagation_delay: Duration = timedelta(minutes=10)
    retire_delay: Duration | Literal["auto"] = "auto"
    # When a scheduled rotation's old root leaves the bundles: "expiry", once nothing under
    # it can still be valid (retire_delay); "proof", once nothing under it is in use (every
    # credential replaced, every meshed Pod restarted twice). Emergencies always use proof.
    retire: Literal["expiry", "proof"] = "expiry"
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
    # An emergency root rotation (after a key leaked) asks for this verb instead.
    emergency_verb: str = "emergency"


class ServerConfig(Section):
    address: str = "127.0.0.1:8080"
    auth: Literal["static", "kubernetes"] = "static"
    token_file: Path | None = None
    sar: ServerSar = ServerSar()
    # Accepted reads (status, operations) in the audit log too; writes and refusals always.
    audit_reads: bool = True

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


def _without_service_links(source: PydanticBaseSettingsSource) -> PydanticBaseSettingsSource:
    """The environment layer without the kubelet's service links: a Service named
    ``ca-daemon-server--x`` would otherwise reach ``server`` as a nested key."""
    if isinstance(source, EnvSettingsSource):
        links = {name.lower() for name, value in os.environ.items() if is_service_link(name, value)}
        source.env_vars = {k: v for k, v in source.env_vars.items() if k.lower() not in links}
    return source


# The YAML layer of the load in progress (config/loading.py sets it around Settings()).
YAML_LAYER: ContextVar[Mapping[str, Any] | None] = ContextVar("yaml_layer", default=None)


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
    # Empty: one cluster, the one the top-level sections describe (named "home").
    clusters: list[ClusterConfig] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _home_sections(cls, data: Any) -> Any:
        """The home cluster's linkerd, kong and bundles may sit in clusters[0] too: moved
        to the top level, where everything single-cluster reads them."""
        if not isinstance(data, dict):
            return data
        clusters = data.get("clusters")
        if not isinstance(clusters, list) or not clusters or not isinstance(clusters[0], dict):
            return data
        home = dict(clusters[0])
        moved = dict(data)
        for section in ("linkerd", "kong", "bundles"):
            if section not in home:
                continue
            if section in data:
                raise RuleError(
                    [
                        (
                            f"clusters[0].{section}",
                            f"the home cluster's {section} is given twice: here and at the "
                            "top level; keep one",
                        )
                    ]
                )
            moved[section] = home.pop(section)
        moved["clusters"] = [home, *clusters[1:]]
        return moved

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_source = InitSettingsSource(settings_cls, dict(YAML_LAYER.get() or {}))
        return (init_settings, _without_service_links(env_settings), yaml_source)

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        return check_dns_subdomain(value)

    @model_validator(mode="after")
    def _fits_rotation_and_x509(self) -> Settings:
        problems = [
            *self._renewal_margins(),
            *self._derived_name_lengths(),
            *self._kong_ca_names_taken(),
            *self._proof_needs_a_data_plane_roll(),
            *self._cluster_rules(),
        ]
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
        for i, cluster in enumerate(self.clusters[1:], start=1):
            if cluster.linkerd is not None:
                issuer = cluster.linkerd.issuer
                yield f"clusters[{i}].linkerd.issuer", issuer.lifetime, issuer.rotate_before
            for j, client in enumerate(cluster.kong.clients if cluster.kong else []):
                path = f"clusters[{i}].kong.clients[{j}]"
                yield path, client.lifetime, client.rotate_before

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

    def _kong_ca_names_taken(self) -> Iterator[tuple[str, str]]:
        """Objects of other roles named like a Kong CA object (kong.clients[].secret is
        checked in KongConfig)."""
        named = [
            ("linkerd.issuer_secret", self.linkerd.issuer_secret),
            ("linkerd.trust_roots_configmap", self.linkerd.trust_roots_configmap),
            *((f"bundles[{i}].configmap", b.configmap) for i, b in enumerate(self.bundles)),
        ]
        for path, name in named:
            try:
                check_not_kong_ca_name(name)
            except ValueError as exc:
                yield path, str(exc)

    def _proof_needs_a_data_plane_roll(self) -> Iterator[tuple[str, str]]:
        # Proof is every meshed Pod restarted; rolling only the control plane never gets
        # there. "none" is allowed: the operator rolls, and the gate waits for it.
        linkerd = self.linkerd
        if (
            self.rotation.retire == "proof"
            and linkerd.enabled
            and linkerd.restart == "control-plane"
        ):
            yield (
                "rotation.retire",
                "proof needs every meshed Pod restarted: set linkerd.restart to all "
                "(or to none and roll the data plane yourself)",
            )

    def _cluster_rules(self) -> Iterator[tuple[str, str]]:
        if self.linked_clusters and self.publish.kubernetes.enabled is False:
            yield (
                "publish.kubernetes.enabled",
                "linked clusters are published to through Kubernetes: it cannot be false",
            )
        names = Counter(c.name for c in self.clusters)
        for i, cluster in enumerate(self.clusters):
            path = f"clusters[{i}]"
            if names[cluster.name] > 1:
                yield f"{path}.name", f"{cluster.name} is given to more than one cluster"
            if i == 0:
                if not cluster.in_rotation:
                    yield f"{path}.in_rotation", "the home cluster always takes part"
                continue
            if cluster.kubeconfig is None:
                yield f"{path}.kubeconfig", "a linked cluster is reached with a kubeconfig"
            if cluster.in_cluster:
                yield f"{path}.in_cluster", "only the home cluster (clusters[0]) is in-cluster"
            kong = cluster.kong
            if kong is not None and kong.enabled:
                if kong.delivery != "kubernetes":
                    yield (
                        f"{path}.kong.delivery",
                        "a linked cluster's Kong is served through Kubernetes only",
                    )
                if not self.kong.enabled:
                    yield (
                        f"{path}.kong.enabled",
                        "a linked cluster's Kong needs Kong on in the home cluster too (its "
                        "clients are signed by the one Kong intermediate)",
                    )
            if cluster.linkerd is not None and cluster.linkerd.enabled and not self.linkerd.enabled:
                yield (
                    f"{path}.linkerd.enabled",
                    "a linked cluster's Linkerd needs Linkerd on in the home cluster too",
                )

    # Derived defaults: computed, never stored, so they follow the fields they depend on.

    @property
    def home_cluster(self) -> str:
        """The name of the cluster the Lease lives in (``home`` when none is listed)."""
        return self.clusters[0].name if self.clusters else HOME

    @property
    def linked_clusters(self) -> list[ClusterConfig]:
        """Every cluster but home."""
        return self.clusters[1:]

    def linked(self, name: str) -> ClusterConfig:
        return next(c for c in self.linked_clusters if c.name == name)

    def linked_linkerd(self, cluster: ClusterConfig) -> LinkerdConfig:
        """A linked cluster's Linkerd settings (the defaults when it gives none)."""
        return cluster.linkerd or LinkerdConfig()

    def linked_kong(self, cluster: ClusterConfig) -> KongConfig:
        """A linked cluster's Kong settings (off when it gives none)."""
        return cluster.kong or KongConfig(enabled=False)

    @property
    def kong_clients_everywhere(self) -> list[KongClient]:
        """Every Kong client to issue: the home cluster's by name, each linked cluster's
        as ``<cluster>/<name>`` (its credential ``kong/<cluster>/<name>``)."""
        if not self.kong.enabled:
            return []
        clients = list(self.kong.clients)
        for cluster in self.linked_clusters:
            kong = self.linked_kong(cluster)
            if kong.enabled:
                clients += [
                    c.model_copy(update={"name": f"{cluster.name}/{c.name}"}) for c in kong.clients
                ]
        return clients

    def credential_lifetimes(self) -> list[timedelta]:
        """The lifetime of every Linkerd issuer and Kong client issued (what the old chain
        may still hold after a root rotation)."""
        lifetimes = [c.lifetime for c in self.kong_clients_everywhere]
        if self.linkerd.enabled:
            lifetimes.append(self.linkerd.issuer.lifetime)
            for cluster in self.linked_clusters:
                linkerd = self.linked_linkerd(cluster)
                if linkerd.enabled:
                    lifetimes.append(linkerd.issuer.lifetime)
        return lifetimes

    def linkerd_of(self, cluster: str | None) -> LinkerdConfig:
        """The Linkerd settings of ``cluster`` (None: home)."""
        return self.linkerd if cluster is None else self.linked_linkerd(self.linked(cluster))

    def for_cluster(self, cluster: ClusterConfig) -> Settings:
        """These settings as a linked cluster sees them: its Linkerd, its Kong, its
        bundles, no Lease and no API authentication there (both live in home): what its
        publisher, rollout and RBAC are built from."""
        return self.model_copy(
            update={
                "linkerd": self.linked_linkerd(cluster),
                # One Kong intermediate for every cluster: home's settings decide it.
                "kong": self.linked_kong(cluster).model_copy(
                    update={"intermediate": self.kong.intermediate}
                ),
                "bundles": cluster.bundles or [],
                "clusters": [],
                "leader_election": self.leader_election.model_copy(update={"enabled": False}),
                "server": self.server.model_copy(update={"auth": "static"}),
            }
        )

    def issuer_common_name(self, cluster: str | None) -> str:
        """The Linkerd issuer's common name in ``cluster`` (None: home)."""
        return f"identity.{self.linkerd_of(cluster).namespace}.{self.trust_domain}"

    @property
    def root_common_name(self) -> str:
        return self.root.common_name or f"root.linkerd.{self.trust_domain}"

    @property
    def linkerd_issuer_common_name(self) -> str:
        return self.issuer_common_name(None)

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
        home = self.clusters[0] if self.clusters else None
        # Clusters listed: each is reached through Kubernetes, whatever the environment.
        listed = bool(self.linked_clusters) or (home is not None and home.kubeconfig is not None)
        return in_cluster or bool(os.environ.get("KUBECONFIG")) or listed

    @property
    def api_token_file(self) -> Path:
        return self.server.token_file or self.anchor.local.dir / "api-token"
