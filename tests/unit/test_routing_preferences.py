"""Per-key model-group preferences: the preferred set, when it is active, missing groups."""

from __future__ import annotations

from gateway.routing.preferences import (
    MissingGroup,
    MissingGroupReports,
    PreferenceKind,
    active_providers,
    is_active,
    missing_groups,
    preferred_set,
)

GROUPS = {
    "fast-lane": frozenset({"gpu-b", "gpu-d"}),
    "h100-pool": frozenset({"gpu-a", "gpu-b"}),
}
PREFERENCES = {"qwen-coder": "fast-lane", "gpt-large": "no-such-group"}


def test_model_without_a_preference_has_none() -> None:
    """A model the key has no preference for yields kind NONE and no providers."""
    result = preferred_set(PREFERENCES, GROUPS, "llama", ["gpu-a", "gpu-b"])
    assert result.kind is PreferenceKind.NONE
    assert result.providers == frozenset()


def test_preferred_set_is_group_members_among_the_candidates() -> None:
    """The preferred set is the group's members intersected with this request's candidates."""
    result = preferred_set(PREFERENCES, GROUPS, "qwen-coder", ["gpu-a", "gpu-b", "gpu-c"])
    assert result.kind is PreferenceKind.GROUP
    assert result.group == "fast-lane"
    assert result.providers == frozenset({"gpu-b"})


def test_preferred_set_may_be_empty() -> None:
    """A group with no member among the candidates gives an empty preferred set."""
    result = preferred_set(PREFERENCES, GROUPS, "qwen-coder", ["gpu-a", "gpu-c"])
    assert result.kind is PreferenceKind.GROUP
    assert result.providers == frozenset()


def test_preference_for_a_missing_group_is_reported_not_applied() -> None:
    """A preference naming an unconfigured group is flagged and prefers nobody."""
    result = preferred_set(PREFERENCES, GROUPS, "gpt-large", ["gpu-a"])
    assert result.kind is PreferenceKind.MISSING_GROUP
    assert result.group == "no-such-group"
    assert result.providers == frozenset()


def test_preference_is_active_when_a_preferred_provider_is_available() -> None:
    """At least one preferred provider available now makes the preference active."""
    result = preferred_set(PREFERENCES, GROUPS, "qwen-coder", ["gpu-a", "gpu-b", "gpu-d"])
    assert is_active(result, {"gpu-a", "gpu-d"})
    assert active_providers(result, {"gpu-a", "gpu-d"}) == frozenset({"gpu-b", "gpu-d"})


def test_preference_is_inactive_when_every_preferred_provider_is_busy_or_cooling() -> None:
    """With no preferred provider available the preference is inactive: soft fallback."""
    result = preferred_set(PREFERENCES, GROUPS, "qwen-coder", ["gpu-a", "gpu-b", "gpu-d"])
    assert not is_active(result, {"gpu-a"})
    assert active_providers(result, {"gpu-a"}) is None


def test_empty_or_missing_preference_is_never_active() -> None:
    """An empty preferred set, a missing group or no preference is never active."""
    available = {"gpu-a", "gpu-b", "gpu-c", "gpu-d"}
    empty = preferred_set(PREFERENCES, GROUPS, "qwen-coder", ["gpu-a", "gpu-c"])
    missing = preferred_set(PREFERENCES, GROUPS, "gpt-large", sorted(available))
    absent = preferred_set(PREFERENCES, GROUPS, "llama", sorted(available))
    assert not any(is_active(result, available) for result in (empty, missing, absent))


def test_missing_groups_lists_each_preference_naming_an_unknown_group() -> None:
    """`check-config` gets every preference whose group is not configured, by model."""
    preferences = {"zeta": "ghost", "alpha": "phantom", "qwen-coder": "fast-lane"}
    assert missing_groups(preferences, GROUPS) == [
        MissingGroup("alpha", "phantom"),
        MissingGroup("zeta", "ghost"),
    ]


def test_missing_groups_is_empty_when_every_group_exists() -> None:
    """A key whose preferences all name configured groups has no warnings."""
    assert missing_groups({"qwen-coder": "fast-lane"}, GROUPS) == []


def test_missing_group_is_reported_once_per_key_and_model() -> None:
    """The first report of a missing group says so; repeats for the same key and model do not."""
    reports = MissingGroupReports()
    assert reports.first_report("acme-ci", "gpt-large", "no-such-group")
    assert not reports.first_report("acme-ci", "gpt-large", "no-such-group")
    assert reports.first_report("acme-dev", "gpt-large", "no-such-group")
