"""Validated, frozen settings: the shape of config.example.yaml, field for field. The sections
live by concept in `config_service` (how the gateway runs) and `config_fleet` (the fleet and its
tenants) on `config_base`; `Settings` is the whole."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from pydantic import Field

from gateway.config_base import Name, Section
from gateway.config_fleet import KeySettings, ModelSettings, OrgSettings, ProviderSettings
from gateway.config_service import (
    AffinitySettings,
    DatabaseSettings,
    RoutingSettings,
    ServerSettings,
    UsageSettings,
)


class Settings(Section):
    """The whole validated configuration."""

    server: ServerSettings = ServerSettings()
    """The HTTP listener and its limits."""
    database: DatabaseSettings = DatabaseSettings()
    """Where the shared affinity store lives."""
    affinity: AffinitySettings = AffinitySettings()
    """Shared bindings: what they hold, how long, and the store's deadlines."""
    usage: UsageSettings = UsageSettings()
    """Per-minute token rollups per key; restart to change."""
    routing: RoutingSettings = RoutingSettings()
    """Per-process routing: failover, cooldowns, latency bands, sessions, timeouts."""
    providers: Annotated[list[ProviderSettings], Field(min_length=1)]
    """At least one."""
    groups: dict[Name, list[Name]] = Field(default_factory=dict)
    """Extra groups beyond each provider's `group`."""
    models: list[ModelSettings] = Field(default_factory=list)
    """Optional; unlisted served models are `shared`."""
    orgs: list[OrgSettings] = Field(default_factory=list)
    """Organisations owning keys, each with its optional `auto` model."""
    keys: list[KeySettings] = Field(default_factory=list)
    """Client API keys, held only as their SHA-256 digests."""

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
