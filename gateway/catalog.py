"""The runtime view of the config: keys by digest, providers by model, each key's candidates."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from gateway.config import Settings
from gateway.config_fleet import KeySettings, ProviderSettings, hash_key
from gateway.routing.automodel import AutoModelSpec
from gateway.routing.conversations import Scope
from gateway.shared.redaction import Redactor

Stickiness = Literal["shared", "session", "none"]


@dataclass(frozen=True)
class Timeouts:
    """One model's upstream limits: connect, first byte of a stream, a whole non-streamed answer,
    and whether a request that timed out after the upstream accepted it may be replayed."""

    connect_seconds: float
    first_byte_seconds: float
    response_seconds: float
    retry_after_timeout: bool


@dataclass(frozen=True)
class Provider:
    """One upstream endpoint as the proxy uses it."""

    name: str
    routing_identity: str
    base_url: str
    upstream_models: Mapping[str, str]
    credential: str | None = field(repr=False)
    group: str | None
    max_concurrency: int | None
    min_start_interval_seconds: float
    draining: bool = False
    stream_usage: bool = True
    tls_ca_file: str | None = None  # the CAs its https certificate is verified against

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> Provider:
        """Build from validated settings, unwrapping the upstream credential once."""
        return cls(
            name=settings.name,
            routing_identity=settings.identity,
            base_url=settings.base_url,
            upstream_models=dict(settings.models),
            credential=settings.api_key.get_secret_value() if settings.api_key else None,
            group=settings.group,
            max_concurrency=settings.max_concurrency,
            min_start_interval_seconds=settings.min_start_interval_ms / 1000,
            draining=settings.draining,
            stream_usage=settings.stream_usage,
            tls_ca_file=settings.tls_ca_file,
        )

    @cached_property
    def redactor(self) -> Redactor | None:
        """What keeps the credential out of answers (None without one); built on first use."""
        return Redactor(self.credential) if self.credential else None


@dataclass(frozen=True)
class Key:
    """A client key, by its stable id; the digest is kept only to authenticate."""

    id: str
    org: str | None
    digest: str = field(repr=False)
    models: frozenset[str] | None  # None: every model
    route_strategy: Literal["auto", "group", "fixed"]
    route_target: str | None
    model_group_preferences: Mapping[str, str]
    latency_routing: bool
    max_concurrency: int | None
    min_start_interval_seconds: float
    requests_per_minute: int | None = None
    listed_models: tuple[str, ...] = ()  # `models` as the config lists them ("*" included)

    @classmethod
    def from_settings(cls, settings: KeySettings) -> Key:
        """Build from validated settings; a plaintext key is reduced to its digest here."""
        return cls(
            id=settings.id,
            org=settings.org,
            digest=settings.digest,
            models=None if "*" in settings.models else frozenset(settings.models),
            route_strategy=settings.route.strategy,
            route_target=settings.route.group or settings.route.fixed,
            model_group_preferences=dict(settings.model_group_preferences),
            latency_routing=settings.latency_routing,
            max_concurrency=settings.max_concurrency,
            min_start_interval_seconds=settings.min_start_interval_ms / 1000,
            requests_per_minute=settings.requests_per_minute,
            listed_models=tuple(settings.models),
        )

    def allows(self, model: str) -> bool:
        """Whether this key may use the model."""
        return self.models is None or model in self.models


class Catalog:
    """Look-ups the request path needs, precomputed from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.providers: dict[str, Provider] = {
            provider.name: Provider.from_settings(provider) for provider in settings.providers
        }
        self.groups: Mapping[str, frozenset[str]] = settings.group_members()
        self._keys_by_digest: dict[str, Key] = {}
        for key_settings in settings.keys:
            key = Key.from_settings(key_settings)
            self._keys_by_digest[key.digest] = key
        self.keys: dict[str, Key] = {key.id: key for key in self._keys_by_digest.values()}
        self.serving: dict[str, tuple[Provider, ...]] = {}  # public model → its providers
        for provider in self.providers.values():
            for model in provider.upstream_models:
                self.serving[model] = (*self.serving.get(model, ()), provider)
        self._stickiness: dict[str, Stickiness] = {
            model.name: model.stickiness for model in settings.models
        }
        affinity = settings.affinity
        self._scopes: dict[str, Scope] = {
            model.name: model.affinity_scope
            for model in settings.models
            if model.affinity_scope is not None
        }
        self._default_scope: Scope = affinity.scope
        secret = affinity.conversation_secret
        self.conversation_secret = b"" if secret is None else secret.get_secret_value().encode()
        self.conversation_head_bytes = affinity.conversation_head_bytes
        routing = settings.routing
        self._default_timeouts = Timeouts(
            connect_seconds=routing.connect_timeout_seconds,
            first_byte_seconds=routing.first_byte_timeout_seconds,
            response_seconds=routing.response_timeout_seconds,
            retry_after_timeout=routing.retry_after_timeout,
        )
        self._timeouts: dict[str, Timeouts] = {
            model.name: Timeouts(
                connect_seconds=model.connect_timeout_seconds or routing.connect_timeout_seconds,
                first_byte_seconds=model.first_byte_timeout_seconds
                or routing.first_byte_timeout_seconds,
                response_seconds=model.response_timeout_seconds or routing.response_timeout_seconds,
                retry_after_timeout=routing.retry_after_timeout,
            )
            for model in settings.models
        }
        self._model_order = tuple(model.name for model in settings.models)
        self._upstream_ids_kept = frozenset(
            model.name for model in settings.models if model.keep_upstream_model_ids
        )
        self._auto_models: dict[str, AutoModelSpec] = {}
        for org in settings.orgs:
            if org.auto_model is not None:
                self._auto_models[org.name] = org.auto_model.spec()
        self._candidates: dict[tuple[str, str], tuple[Provider, ...]] = {}

    def authenticate(self, token: str) -> Key | None:
        """The key whose digest matches the token's SHA-256, or None."""
        digest = hash_key(token)
        key = self._keys_by_digest.get(digest)
        # The dict look-up is keyed by a digest the caller cannot steer byte by byte; the final
        # comparison is constant-time so no early-exit timing is observable either way.
        if key is None or not hmac.compare_digest(key.digest, digest):
            return None
        return key

    def serves(self, model: str) -> bool:
        """Whether any provider serves the public model name."""
        return model in self.serving

    def stickiness(self, model: str) -> Stickiness:
        """The model's stickiness mode (shared unless configured otherwise)."""
        return self._stickiness.get(model, "shared")

    def affinity_scope(self, model: str) -> Scope:
        """What one shared binding of the model holds: a key's requests, or a conversation's."""
        return self._scopes.get(model, self._default_scope)

    def timeouts(self, model: str) -> Timeouts:
        """The model's upstream timeouts (the routing section's unless it overrides them)."""
        return self._timeouts.get(model, self._default_timeouts)

    def keeps_upstream_ids(self, model: str) -> bool:
        """Whether answers for the model keep the upstream's model id (else: the public name)."""
        return model in self._upstream_ids_kept

    def auto_model(self, key: Key) -> AutoModelSpec | None:
        """The auto-model spec of the key's org, enabled or not, or None when it has none."""
        return self._auto_models.get(key.org) if key.org is not None else None

    def candidates(self, key: Key, model: str) -> tuple[Provider, ...]:
        """Providers serving the model, narrowed by the key's route, never a draining one.

        Cached per (key, model). A draining provider takes no new request, binding or session.
        """
        cached = self._candidates.get((key.id, model))
        if cached is not None:
            return cached
        serving = tuple(
            provider for provider in self.serving.get(model, ()) if not provider.draining
        )
        if key.route_strategy == "group":
            members = self.groups.get(key.route_target or "", frozenset())
            chosen = tuple(provider for provider in serving if provider.name in members)
        elif key.route_strategy == "fixed":
            chosen = tuple(provider for provider in serving if provider.name == key.route_target)
        else:
            chosen = serving
        self._candidates[(key.id, model)] = chosen
        return chosen

    def only_draining(self, key: Key, model: str) -> bool:
        """Whether the key's route has providers for the model, but every one is draining."""
        return not self.candidates(key, model) and any(
            provider.draining for provider in self.serving.get(model, ())
        )

    def default_model(self, key: Key) -> str | None:
        """The model a body without `model` (tokenize, detokenize) goes to: the first model the
        key lists that it can reach; for a `*` key, the first of the `models` section, then the
        first by name. None when the key reaches no model."""
        reachable = [
            model for model in self.serving if key.allows(model) and self.candidates(key, model)
        ]
        order = [name for name in key.listed_models if name != "*"]
        if key.models is None:
            order += [*self._model_order, *sorted(reachable)]
        return next((name for name in order if name in reachable), None)

    def models_for(self, key: Key) -> Sequence[str]:
        """Public model names this key may use, including its org's enabled auto model."""
        names = sorted(
            model for model in self.serving if key.allows(model) and self.candidates(key, model)
        )
        spec = self.auto_model(key)
        if spec is not None and spec.enabled and key.allows(spec.name):
            names.append(spec.name)
        return names
