"""Validated, frozen settings: the shape of config.example.yaml, field for field."""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from gateway.routing.automodel import AutoModelSpec

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
# Characters no header value may carry (every C0 control but HTAB, and DEL).
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    """Base for every config section: frozen; unknown fields are errors, so typos never pass."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# Load-shedding settings of earlier builds, all replaced by `load_shedding_burst_seconds`: a
# config that still has them loads, with a warning that names the replacement (see
# config_loading), so an upgrade never stops a gateway over a setting that no longer applies.
REPLACED_SHEDDING_SETTINGS = frozenset(
    {"load_shedding_target_lag_ms", "load_shedding_target_delay_ms", "load_shedding_interval_ms"}
)


class ServerSettings(Section):
    """The HTTP listener and its limits.

    The connection limits guard each worker against slow and oversized clients: a request head
    must arrive within `header_read_timeout_seconds` (on a new connection, counted from accept),
    its body within `body_read_timeout_seconds`; an idle keep-alive connection closes after
    `keepalive_timeout_seconds` (keep it above the load balancer's upstream idle timeout); a head
    over `max_header_bytes` or `max_header_count` headers gets 431; connections beyond
    `max_connections_per_worker` get 503 (each proxied request also holds an upstream socket,
    so allow at least twice this many open files). One key's requests in progress on a worker,
    from their head until their answer ends (bodies still arriving included), may hold more than
    `max_connection_share_per_key` of that cap only while the worker is not crowded (its requests
    in progress hold under three quarters of the cap): past its share on a crowded worker a key's
    requests get 429 before their body is read, so one client may use a quiet worker whole and a
    flooding key leaves at least a quarter of the cap (or the rest of its share) to the others.

    What a worker holds in memory for requests (bodies being read, upload copies kept for a
    failover, non-streamed answers read whole) is at most `memory_budget_bytes`, one key's at
    most `memory_share_per_key` of it: past it a body gets 503 (429 for the key over its share)
    before more of it is read, and an answer waits up to `routing.wait_timeout_seconds` first
    (see `gateway.dispatch.memory_budget`). `max_buffered_answer_bytes` is its former name.

    On SIGTERM a worker fails `/readyz` and answers with `Connection: close` for
    `drain_delay_seconds` (match the Kubernetes `preStop` sleep; keep it above the load balancer's
    upstream idle keep-alive timeout), then stops accepting and finishes in-flight requests up to
    `shutdown_timeout_seconds`.

    With `load_shedding` (on by default), a worker refuses only sustained overload: a burst whose
    queue (the time between a request's head being read and its handler starting) drains within
    `load_shedding_burst_seconds` is never refused; a queue that stands past it for a tenth of it
    makes the worker overloaded, and until it drains each new proxied request that queued past a
    quarter of it is answered 503 with `Retry-After` at once (see `gateway.edge.overload`). Off,
    the delay is still measured and published; nothing is refused.
    """

    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    workers: Annotated[int, Field(ge=1, le=256)] = 2
    max_body_bytes: PositiveInt = 10 * 1024 * 1024
    admin_token: SecretStr | None = None
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    shutdown_timeout_seconds: PositiveFloat = 30.0
    drain_delay_seconds: NonNegativeFloat = 5.0
    header_read_timeout_seconds: PositiveFloat = 10.0
    body_read_timeout_seconds: PositiveFloat = 60.0
    keepalive_timeout_seconds: PositiveFloat = 75.0
    max_header_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024
    max_header_count: PositiveInt = 100
    max_connections_per_worker: PositiveInt = 1024
    max_connection_share_per_key: Annotated[float, Field(gt=0, le=1)] = 0.5
    cors_allow_origins: list[str] = Field(default_factory=list)
    request_compression: bool = False
    memory_budget_bytes: PositiveInt = 256 * 1024 * 1024
    memory_share_per_key: Annotated[float, Field(gt=0, le=1)] = 0.5
    max_buffered_answer_bytes: PositiveInt | None = None  # the former name of the budget
    load_shedding: bool = True
    load_shedding_burst_seconds: Annotated[float, Field(ge=0.01)] = 1.0

    @field_validator("admin_token", mode="after")
    @classmethod
    def _empty_token_disables(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        return value

    @model_validator(mode="before")
    @classmethod
    def _former_answer_budget(cls, data: Any) -> Any:
        """`max_buffered_answer_bytes` (answers only, in earlier builds) sets the whole budget."""
        if not isinstance(data, dict) or data.get("max_buffered_answer_bytes") is None:
            return data
        if "memory_budget_bytes" in data:
            raise ValueError(
                "`max_buffered_answer_bytes` is the former name of `memory_budget_bytes` (one "
                "budget for request bodies, upload copies and buffered answers): set only that"
            )
        return {**data, "memory_budget_bytes": data["max_buffered_answer_bytes"]}


class DatabaseSettings(Section):
    """Where the shared affinity store lives; no URL means the embedded single-machine Postgres.

    `listen_url` is a direct connection (not through PgBouncer in transaction mode) on which each
    worker hears binding changes; empty means `url`.
    """

    url: SecretStr | None = None
    listen_url: SecretStr | None = None
    embedded_data_dir: str = ".gateway/pgdata"
    pool_min_size: Annotated[int, Field(ge=0)] = 2
    pool_max_size: PositiveInt = 10
    statement_cache_size: Annotated[int, Field(ge=0)] = 100
    apply_migrations_on_start: bool = True
    # Set when `url` is an embedded server's, derived at start rather than configured.
    _embedded_url: bool = PrivateAttr(default=False)

    def with_embedded_url(self, url: str) -> DatabaseSettings:
        """These settings pointing at an embedded Postgres's URL, marked as derived."""
        derived = self.model_copy(update={"url": SecretStr(url)})
        derived._embedded_url = True
        return derived

    def as_configured(self) -> DatabaseSettings:
        """These settings as the config gave them: an embedded server's derived URL is none."""
        if not self._embedded_url:
            return self
        configured = self.model_copy(update={"url": None})
        configured._embedded_url = False
        return configured

    @field_validator("url", "listen_url", mode="after")
    @classmethod
    def _empty_url_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        return value

    @model_validator(mode="after")
    def _pool_bounds(self) -> DatabaseSettings:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("pool_min_size must not exceed pool_max_size")
        return self


class SpillSettings(Section):
    """When a bound provider is loaded enough to skip it for one request."""

    min_load: NonNegativeFloat = 32
    ratio: Annotated[float, Field(ge=1)] = 1.5


class AffinitySettings(Section):
    """Shared bindings: TTLs, deadlines, breaker and background work, and what one binding holds.

    `scope` is the default of every model's `affinity_scope`: `key` binds `(key, model)`;
    `conversation` binds `(key, model, conversation)` (see `gateway.routing.conversations`).
    """

    ttl_seconds: PositiveFloat = 300
    local_cache_seconds: NonNegativeFloat = 5
    lookup_timeout_ms: PositiveFloat = 50
    claim_timeout_ms: PositiveFloat = 500
    breaker_cooloff_seconds: PositiveFloat = 10
    agreement_slack: NonNegativeFloat = 0.1
    responses_ttl_seconds: PositiveFloat = 3600
    responses_max_per_key: PositiveInt = 100_000
    renew_queue_size: PositiveInt = 10000
    janitor_interval_seconds: PositiveFloat = 60
    janitor_grace_seconds: NonNegativeFloat = 300
    spill: SpillSettings = SpillSettings()
    scope: Literal["key", "conversation"] = "key"
    conversation_secret: SecretStr | None = None
    conversation_head_bytes: PositiveInt = 4096


class UsageSettings(Section):
    """Usage accounting: per-minute rollups in the store, written in batches off the hot path."""

    enabled: bool = True
    flush_interval_seconds: PositiveFloat = 10
    retention_days: PositiveFloat = 35
    max_pending_rows: PositiveInt = 100_000
    janitor_interval_seconds: PositiveFloat = 300


class RoutingSettings(Section):
    """Per-process routing: permits, failover, cooldowns, latency bands, sessions, timeouts.

    Failures a client's request could have caused (an upstream 5xx, a timeout) cool a provider
    only when they come from two keys, and never more than `max_cooling_fraction` of a model's
    providers at once; an unreachable provider or a 429 cools whatever the share.

    Failover attempts beyond a request's first are a retry budget per worker: at most
    `retry_budget_percent` % of its requests in flight, and never fewer than
    `retry_budget_min_concurrent`, may be retrying at once (100: no budget).
    """

    wait_timeout_seconds: NonNegativeFloat = 5
    failover_budget: PositiveInt = 3
    retry_budget_percent: Annotated[float, Field(ge=0, le=100)] = 20
    retry_budget_min_concurrent: Annotated[int, Field(ge=0)] = 3
    allowed_fails: PositiveInt = 3
    cooldown_seconds: PositiveFloat = 5
    cooldown_max_seconds: PositiveFloat = 300
    max_cooling_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    latency_window_seconds: PositiveFloat = 900
    latency_band_fraction: PositiveFloat = 0.15
    latency_min_samples: Annotated[int, Field(ge=0)] = 20
    latency_band_hysteresis: Annotated[float, Field(ge=0, lt=0.5)] = 0.25
    latency_sample_max_age_seconds: PositiveFloat = 60
    node_latency_window_seconds: PositiveFloat = 10
    session_ttl_seconds: PositiveFloat = 21600
    session_capacity: PositiveInt = 4096
    load_poll_interval_seconds: PositiveFloat = 1
    connect_timeout_seconds: PositiveFloat = 5
    first_byte_timeout_seconds: PositiveFloat = 120
    response_timeout_seconds: PositiveFloat = 600
    retry_after_timeout: bool = False
    downstream_write_timeout_seconds: PositiveFloat = 60
    mode_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,100}$")] = "x-gateway-mode"

    @model_validator(mode="after")
    def _cooldown_bounds(self) -> RoutingSettings:
        if self.cooldown_seconds > self.cooldown_max_seconds:
            raise ValueError("cooldown_seconds must not exceed cooldown_max_seconds")
        return self


class ProviderSettings(Section):
    """One upstream endpoint: a vLLM/SGLang node or one hosted account."""

    name: Name
    url: AnyHttpUrl
    group: Name | None = None
    models: Annotated[dict[Name, Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    routing_identity: Name | None = None
    api_key: SecretStr | None = None
    tls_ca_file: str | None = None
    max_concurrency: PositiveInt | None = None
    min_start_interval_ms: NonNegativeFloat = 0
    draining: bool = False
    # Ask this upstream for a stream's usage event when the client did not (vLLM accepts it);
    # false for an upstream that rejects `stream_options`.
    stream_usage: bool = True

    @field_validator("api_key", mode="after")
    @classmethod
    def _header_safe_key(cls, value: SecretStr | None) -> SecretStr | None:
        # The key goes into every request's `Authorization` header: a line break or other
        # control character would break (or smuggle into) the head. Never quote the key itself.
        if value is not None and _CONTROL_CHARACTER.search(value.get_secret_value()):
            raise ValueError("api_key contains a line break or another control character")
        return value

    @field_validator("tls_ca_file", mode="after")
    @classmethod
    def _usable_ca_file(cls, value: str | None) -> str | None:
        # Checked here so check-config finds a missing or unreadable file, not the first request.
        if value is None:
            return None
        try:
            ssl.create_default_context(cafile=value)
        except FileNotFoundError:
            raise ValueError(f"tls_ca_file {value!r} does not exist") from None
        except (OSError, ssl.SSLError) as error:
            raise ValueError(
                f"tls_ca_file {value!r} holds no usable PEM certificate: {error}"
            ) from None
        return value

    @property
    def identity(self) -> str:
        """The routing identity: aliases of one upstream account share it; defaults to the name."""
        return self.routing_identity or self.name

    @property
    def base_url(self) -> str:
        """The URL without a trailing slash, ready to have a path appended."""
        return str(self.url).rstrip("/")


class ModelSettings(Section):
    """A public model name, how its requests stick to a provider, and its own timeouts.

    A timeout left out takes the `routing` section's value. `keep_upstream_model_ids` passes
    answers on with the upstream's model id instead of the public name the client asked for.
    `affinity_scope` left out takes `affinity.scope`.
    """

    name: Name
    stickiness: Literal["shared", "session", "none"] = "shared"
    affinity_scope: Literal["key", "conversation"] | None = None
    connect_timeout_seconds: PositiveFloat | None = None
    first_byte_timeout_seconds: PositiveFloat | None = None
    response_timeout_seconds: PositiveFloat | None = None
    keep_upstream_model_ids: bool = False


class AutoModelSettings(Section):
    """An org's virtual model that picks a concrete model from the request's mode."""

    enabled: bool = False
    name: Name = "auto"
    fallback_model: Name | None = None
    routes: dict[str, str] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(
        default_factory=lambda: {"build": "code", "plan": "architect"},
    )

    def spec(self) -> AutoModelSpec:
        """The plain value the routing policy resolves and validates."""
        return AutoModelSpec(
            enabled=self.enabled,
            name=self.name,
            fallback_model=self.fallback_model or "",
            routes=dict(self.routes),
            aliases=dict(self.aliases),
        )


class OrgSettings(Section):
    """An organisation owning keys."""

    name: Name
    auto_model: AutoModelSettings | None = None


class RouteSettings(Section):
    """How a key's candidates are narrowed: all of them, one group, or one fixed provider."""

    strategy: Literal["auto", "group", "fixed"] = "auto"
    group: Name | None = None
    fixed: Name | None = None

    @model_validator(mode="after")
    def _target_matches_strategy(self) -> RouteSettings:
        if self.strategy == "group" and self.group is None:
            raise ValueError("strategy 'group' needs `group: NAME`")
        if self.strategy == "fixed" and self.fixed is None:
            raise ValueError("strategy 'fixed' needs `fixed: PROVIDER`")
        if self.strategy == "auto" and (self.group is not None or self.fixed is not None):
            raise ValueError("strategy 'auto' takes neither `group` nor `fixed`")
        if self.strategy == "group" and self.fixed is not None:
            raise ValueError("strategy 'group' takes no `fixed`")
        if self.strategy == "fixed" and self.group is not None:
            raise ValueError("strategy 'fixed' takes no `group`")
        return self


class KeySettings(Section):
    """A client API key, held only as its SHA-256 digest."""

    id: Name
    org: Name | None = None
    key_sha256: str | None = None
    key: SecretStr | None = None
    models: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: ["*"])
    route: RouteSettings = RouteSettings()
    model_group_preferences: dict[Name, Name] = Field(default_factory=dict)
    latency_routing: bool = True
    max_concurrency: PositiveInt | None = None
    requests_per_minute: PositiveInt | None = None
    min_start_interval_ms: NonNegativeFloat = 0

    @model_validator(mode="before")
    @classmethod
    def _hash_plaintext_key(cls, data: Any) -> Any:
        """A plaintext `key` becomes `key_sha256` before anything keeps it."""
        if not isinstance(data, dict) or data.get("key_sha256") is not None:
            return data  # both given: `_exactly_one_secret` reports it
        key = data.get("key")
        if isinstance(key, SecretStr):
            key = key.get_secret_value()
        if not isinstance(key, str) or not key:
            return data
        return {**data, "key": None, "key_sha256": hash_key(key)}

    @field_validator("key_sha256", mode="after")
    @classmethod
    def _digest_shape(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digest = value.strip().lower()
        if not SHA256_HEX.match(digest):
            raise ValueError("key_sha256 must be 64 hex characters (run `gateway hash-key`)")
        return digest

    @model_validator(mode="after")
    def _exactly_one_secret(self) -> KeySettings:
        has_key = self.key is not None and bool(self.key.get_secret_value())
        if has_key == (self.key_sha256 is not None):
            raise ValueError("give exactly one of `key_sha256` or `key`")
        return self

    @property
    def digest(self) -> str:
        """The SHA-256 hex digest of the key (a plaintext `key` was replaced by it at load)."""
        assert self.key_sha256 is not None  # guaranteed by _hash_plaintext_key and the check
        return self.key_sha256

    def allows(self, model: str) -> bool:
        """Whether this key may use the public model name."""
        return "*" in self.models or model in self.models


class Settings(Section):
    """The whole validated configuration."""

    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    affinity: AffinitySettings = AffinitySettings()
    usage: UsageSettings = UsageSettings()
    routing: RoutingSettings = RoutingSettings()
    providers: Annotated[list[ProviderSettings], Field(min_length=1)]
    groups: dict[Name, list[Name]] = Field(default_factory=dict)
    models: list[ModelSettings] = Field(default_factory=list)
    orgs: list[OrgSettings] = Field(default_factory=list)
    keys: list[KeySettings] = Field(default_factory=list)

    def group_members(self) -> Mapping[str, frozenset[str]]:
        """Every group: each provider's `group` plus the explicit `groups` section."""
        members: dict[str, set[str]] = {}
        for provider in self.providers:
            if provider.group is not None:
                members.setdefault(provider.group, set()).add(provider.name)
        for group, names in self.groups.items():
            members.setdefault(group, set()).update(names)
        return {group: frozenset(names) for group, names in members.items()}

    def served_models(self) -> frozenset[str]:
        """Every public model name some provider serves."""
        return frozenset(model for provider in self.providers for model in provider.models)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of a client key, as stored in `key_sha256`."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
