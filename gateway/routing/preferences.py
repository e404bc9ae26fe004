"""Per-key model-group preferences: which candidates a key prefers for a model, and when that holds.

A preference is active only while at least one preferred provider can take the request now;
otherwise routing falls back softly to the other candidates.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass


class PreferenceKind(enum.Enum):
    """What a key's preferences say about one requested model."""

    NONE = "none"
    """The key has no preference for this model."""
    MISSING_GROUP = "missing-group"
    """The preference names a group that does not exist: skip it and warn once."""
    GROUP = "group"
    """The preference names a group; its members among the candidates are preferred."""


@dataclass(frozen=True, slots=True)
class PreferredSet:
    """The outcome of a key's preference for one model, with the preferred candidates if any."""

    kind: PreferenceKind
    group: str | None = None
    providers: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class MissingGroup:
    """A preference of `model` for a `group` that is not configured."""

    model: str
    group: str


NO_PREFERENCE = PreferredSet(PreferenceKind.NONE)


def preferred_set(
    preferences: Mapping[str, str],
    groups: Mapping[str, frozenset[str]],
    model: str,
    candidates: Collection[str],
) -> PreferredSet:
    """Return the key's preferred providers for `model`: group members among `candidates`."""
    group = preferences.get(model)
    if group is None:
        return NO_PREFERENCE
    members = groups.get(group)
    if members is None:
        return PreferredSet(PreferenceKind.MISSING_GROUP, group)
    return PreferredSet(PreferenceKind.GROUP, group, members.intersection(candidates))


def is_active(preferred: PreferredSet, available: Collection[str]) -> bool:
    """Return whether the preference holds now: a preferred provider is in `available`."""
    return preferred.kind is PreferenceKind.GROUP and not preferred.providers.isdisjoint(available)


def active_providers(preferred: PreferredSet, available: Collection[str]) -> frozenset[str] | None:
    """Return the preferred providers when the preference is active, else None (for ordering)."""
    return preferred.providers if is_active(preferred, available) else None


def missing_groups(
    preferences: Mapping[str, str], groups: Mapping[str, frozenset[str]]
) -> list[MissingGroup]:
    """List the preferences that name an unconfigured group, by model, for `check-config`."""
    return [
        MissingGroup(model, group)
        for model, group in sorted(preferences.items())
        if group not in groups
    ]


class MissingGroupReports:
    """Remembers which missing-group preferences were already reported, so each warns once."""

    def __init__(self) -> None:
        """Start with nothing reported."""
        self._reported: set[tuple[str, str, str]] = set()

    def first_report(self, key_id: str, model: str, group: str) -> bool:
        """Return True the first time this key's preference is reported, False afterwards."""
        entry = (key_id, model, group)
        if entry in self._reported:
            return False
        self._reported.add(entry)
        return True
