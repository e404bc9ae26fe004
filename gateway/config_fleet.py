"""The fleet and its tenants: providers, models, the `auto` models, orgs, routes and keys."""

from __future__ import annotations

import hashlib
import ssl
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from gateway.config_base import (
    CONTROL_CHARACTER,
    SHA256_HEX,
    Name,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Section,
)
from gateway.routing.automodel import AutoModelSpec


class ProviderSettings(Section):
    """One upstream endpoint: a vLLM/SGLang node or one hosted account."""

    name: Name
    """The provider's name: what logs, metrics and `x-gateway-provider` show."""
    url: AnyHttpUrl
    """The upstream's base URL."""
    group: Name | None = None
    """A group this provider belongs to (routes and preferences name groups)."""
    models: Annotated[dict[Name, Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    """Public name → upstream id."""
    routing_identity: Name | None = None
    """Default: the name; aliases of one account share it."""
    api_key: SecretStr | None = None
    """Sent upstream as the bearer token, never logged."""
    tls_ca_file: str | None = None
    """https verified against these CAs, not the system's."""
    max_concurrency: PositiveInt | None = None
    """Per process; default: no limit."""
    min_start_interval_ms: NonNegativeFloat = 0
    """Per process: the least time between two requests started on this provider."""
    draining: bool = False
    """True: no new requests, bindings or sessions; in-flight ones finish; keys move on their next
    request.
    """
    stream_usage: bool = True
    """Ask streams for their usage event (taken out again); false if the upstream rejects
    `stream_options`.
    """

    @field_validator("api_key", mode="after")
    @classmethod
    def _header_safe_key(cls, value: SecretStr | None) -> SecretStr | None:
        # The key goes into every request's `Authorization` header: a line break or other
        # control character would break (or smuggle into) the head. Never quote the key itself.
        if value is not None and CONTROL_CHARACTER.search(value.get_secret_value()):
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
    """The public model name."""
    stickiness: Literal["shared", "session", "none"] = "shared"
    """`shared` (the shared binding), `session` (the per-process session table) or `none`."""
    affinity_scope: Literal["key", "conversation"] | None = None
    """`key` or `conversation`; default: `affinity.scope`."""
    connect_timeout_seconds: PositiveFloat | None = None
    """Default: the routing section's."""
    first_byte_timeout_seconds: PositiveFloat | None = None
    """Default: the routing section's."""
    response_timeout_seconds: PositiveFloat | None = None
    """Default: the routing section's."""
    keep_upstream_model_ids: bool = False
    """True: answers keep the upstream's model id."""


class AutoModelSettings(Section):
    """An org's virtual model that picks a concrete model from the request's mode."""

    enabled: bool = False
    """A disabled or missing auto model is a 400 that says so."""
    name: Name = "auto"
    """The virtual model's public name."""
    fallback_model: Name | None = None
    """The model for a missing or unknown mode."""
    routes: dict[str, str] = Field(default_factory=dict)
    """Mode → model."""
    aliases: dict[str, str] = Field(
        default_factory=lambda: {"build": "code", "plan": "architect"},
    )
    """One-way mode aliases, resolved when no route matches exactly."""

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
    """The org's name, which keys name in `org`."""
    auto_model: AutoModelSettings | None = None
    """The org's `auto` model, if any."""


class RouteSettings(Section):
    """How a key's candidates are narrowed: all of them, one group, or one fixed provider."""

    strategy: Literal["auto", "group", "fixed"] = "auto"
    """`auto` (every candidate), `group` or `fixed`."""
    group: Name | None = None
    """With `strategy: group`: the group."""
    fixed: Name | None = None
    """With `strategy: fixed`: the provider."""

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
    """Stable id: what logs and metrics show."""
    org: Name | None = None
    """The org the key belongs to."""
    key_sha256: str | None = None
    """The key's SHA-256 (`gateway hash-key`); give this or `key`."""
    key: SecretStr | None = None
    """The key itself, e.g. `${ACME_CI_KEY}` (hashed at load, never kept); prefer `key_sha256` in
    production.
    """
    models: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: ["*"])
    """Public model names the key may use; `*`: all."""
    route: RouteSettings = RouteSettings()
    """How the key's candidates are narrowed."""
    model_group_preferences: dict[Name, Name] = Field(default_factory=dict)
    """Model → group preferred for it while a member is available."""
    latency_routing: bool = True
    """Order candidates by latency band."""
    max_concurrency: PositiveInt | None = None
    """Across every worker and replica (see security.md, "Cluster-wide key limits")."""
    requests_per_minute: PositiveInt | None = None
    """Across every worker and replica; default: no limit."""
    min_start_interval_ms: NonNegativeFloat = 0
    """Per worker."""

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


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of a client key, as stored in `key_sha256`."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
