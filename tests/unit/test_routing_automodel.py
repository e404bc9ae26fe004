"""The org `auto` model: mode normalisation, resolution order, errors and validation."""

from __future__ import annotations

import pytest

from gateway.routing.automodel import (
    MAX_MODE_LENGTH,
    AutoModelDisabled,
    AutoModelSpec,
    InvalidAutoRoute,
    Resolution,
    normalize_mode,
    resolve,
    validate_spec,
)

KNOWN_MODELS = frozenset({"llama", "qwen-coder", "gpt-large", "planner"})
SPEC = AutoModelSpec(
    enabled=True,
    name="auto",
    fallback_model="llama",
    routes={"code": "qwen-coder", "architect": "gpt-large", "build": "planner"},
)


def is_known(model: str) -> bool:
    """Return whether `model` is one of the configured test models."""
    return model in KNOWN_MODELS


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Code ", "code"),
        ("ARCHITECT", "architect"),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_normalize_mode_trims_and_lower_cases(raw: str | None, expected: str | None) -> None:
    """The mode header is trimmed and lower-cased; blank or missing gives no mode."""
    assert normalize_mode(raw) == expected


def test_normalize_mode_caps_the_length() -> None:
    """A mode longer than 500 characters is cut to 500."""
    assert normalize_mode("m" * 2000) == "m" * MAX_MODE_LENGTH


def test_exact_route_wins_over_an_alias() -> None:
    """`build` has its own route here, so the default `build → code` alias is not used."""
    assert resolve(SPEC, "build", is_valid_model=is_known) == Resolution(
        "planner", "route", "build"
    )


def test_alias_uses_the_aliased_modes_route() -> None:
    """`plan` has no route of its own and follows the alias to the `architect` route."""
    assert resolve(SPEC, "plan", is_valid_model=is_known) == Resolution(
        "gpt-large", "alias", "plan"
    )


def test_default_build_alias_reaches_the_code_route() -> None:
    """Without a `build` route, `build` resolves through the default alias to `code`."""
    spec = AutoModelSpec(enabled=True, fallback_model="llama", routes={"code": "qwen-coder"})
    assert resolve(spec, "Build", is_valid_model=is_known) == Resolution(
        "qwen-coder", "alias", "build"
    )


def test_aliases_are_one_way() -> None:
    """With only a `build` route, `code` falls back; it never borrows `build`'s route."""
    spec = AutoModelSpec(enabled=True, fallback_model="llama", routes={"build": "planner"})
    assert resolve(spec, "code", is_valid_model=is_known) == Resolution("llama", "fallback", "code")
    assert resolve(spec, "architect", is_valid_model=is_known).via == "fallback"


@pytest.mark.parametrize("mode", [None, "", "review", "x" * 600])
def test_missing_or_unknown_mode_uses_the_fallback_model(mode: str | None) -> None:
    """No mode, a blank one or one without a route or alias resolves to the fallback."""
    resolution = resolve(SPEC, mode, is_valid_model=is_known)
    assert resolution.model == "llama"
    assert resolution.via == "fallback"


def test_alias_to_a_mode_without_a_route_uses_the_fallback() -> None:
    """An alias whose target mode has no route falls through to the fallback model."""
    spec = AutoModelSpec(enabled=True, fallback_model="llama", routes={})
    assert resolve(spec, "plan", is_valid_model=is_known) == Resolution("llama", "fallback", "plan")


def test_disabled_auto_model_is_an_error_that_says_so() -> None:
    """A disabled auto model refuses with a message naming it and saying it is disabled."""
    spec = AutoModelSpec(enabled=False, name="auto", fallback_model="llama", routes=SPEC.routes)
    with pytest.raises(AutoModelDisabled, match="'auto' model is disabled"):
        resolve(spec, "code", is_valid_model=is_known)


def test_invalid_explicit_route_is_an_error_not_a_fallback() -> None:
    """A route to a model that is not valid now raises, naming the mode and target."""
    spec = AutoModelSpec(enabled=True, fallback_model="llama", routes={"code": "retired-model"})
    with pytest.raises(InvalidAutoRoute, match=r"'code' route .* 'retired-model'"):
        resolve(spec, "code", is_valid_model=is_known)


def test_invalid_route_reached_through_an_alias_is_an_error() -> None:
    """`build` aliased to a `code` route with an invalid target raises too."""
    spec = AutoModelSpec(enabled=True, fallback_model="llama", routes={"code": "retired-model"})
    with pytest.raises(InvalidAutoRoute, match="retired-model"):
        resolve(spec, "build", is_valid_model=is_known)


def test_route_back_to_the_auto_model_itself_is_an_error() -> None:
    """A route whose target is the auto model's own name raises instead of looping."""
    spec = AutoModelSpec(enabled=True, fallback_model="llama", routes={"code": "auto"})
    with pytest.raises(InvalidAutoRoute, match="'auto'"):
        resolve(spec, "code", is_valid_model=lambda _model: True)


@pytest.mark.parametrize("fallback", ["retired-model", "", "auto"])
def test_invalid_fallback_model_is_an_error(fallback: str) -> None:
    """A fallback that is missing, unknown or the auto model itself raises."""
    spec = AutoModelSpec(enabled=True, fallback_model=fallback, routes={})
    with pytest.raises(InvalidAutoRoute, match="fallback model"):
        resolve(spec, "review", is_valid_model=lambda model: model != "retired-model")


def test_valid_spec_has_no_problems() -> None:
    """A spec with slug modes, known targets and default aliases validates cleanly."""
    assert validate_spec(SPEC, KNOWN_MODELS) == []


def test_default_aliases_without_their_routes_are_not_problems() -> None:
    """Default aliases whose target modes have no route are inactive, not configuration errors."""
    spec = AutoModelSpec(enabled=True, fallback_model="llama", routes={"review": "gpt-large"})
    assert validate_spec(spec, KNOWN_MODELS) == []


@pytest.mark.parametrize("mode", ["Code", "code_review", "", "m" * 51, "plan!"])
def test_route_modes_must_be_slugs(mode: str) -> None:
    """Route modes outside `^[a-z0-9-]{1,50}$` are reported at `routes.<mode>`."""
    spec = AutoModelSpec(enabled=True, fallback_model="llama", routes={mode: "llama"})
    assert validate_spec(spec, KNOWN_MODELS) == [
        (f"routes.{mode}", f"mode '{mode}' must match ^[a-z0-9-]{{1,50}}$")
    ]


def test_alias_keys_and_targets_must_be_slugs_and_targets_route_modes() -> None:
    """Aliases are checked as slugs on both sides, and a custom alias must reach a route mode."""
    spec = AutoModelSpec(
        enabled=True,
        fallback_model="llama",
        routes={"code": "qwen-coder"},
        aliases={"Fix": "code", "review": "BAD MODE", "debug": "triage"},
    )
    assert validate_spec(spec, KNOWN_MODELS) == [
        ("aliases.Fix", "mode 'Fix' must match ^[a-z0-9-]{1,50}$"),
        ("aliases.review", "mode 'BAD MODE' must match ^[a-z0-9-]{1,50}$"),
        ("aliases.debug", "alias target 'triage' is not a route mode"),
    ]


def test_at_most_one_hundred_routes() -> None:
    """More than 100 routes is one problem at `routes`."""
    routes = {f"mode-{index}": "llama" for index in range(101)}
    spec = AutoModelSpec(enabled=True, fallback_model="llama", routes=routes)
    assert validate_spec(spec, KNOWN_MODELS) == [("routes", "at most 100 routes, got 101")]
    exactly_enough = AutoModelSpec(
        enabled=True, fallback_model="llama", routes=dict(list(routes.items())[:100])
    )
    assert validate_spec(exactly_enough, KNOWN_MODELS) == []


def test_targets_may_not_be_the_auto_model_itself() -> None:
    """A route or fallback naming the auto model is reported at its path."""
    spec = AutoModelSpec(enabled=True, name="auto", fallback_model="auto", routes={"code": "auto"})
    assert validate_spec(spec, KNOWN_MODELS) == [
        ("routes.code", "may not point to the auto model 'auto' itself"),
        ("fallback_model", "may not point to the auto model 'auto' itself"),
    ]


def test_targets_must_be_configured_models() -> None:
    """Unknown route targets and an unknown or empty fallback are reported."""
    spec = AutoModelSpec(enabled=True, fallback_model="", routes={"code": "ghost"})
    assert validate_spec(spec, KNOWN_MODELS) == [
        ("routes.code", "'ghost' is not a configured model"),
        ("fallback_model", "a target model is required"),
    ]


def test_auto_model_needs_a_name() -> None:
    """An empty auto model name is reported at `name`."""
    spec = AutoModelSpec(enabled=True, name="", fallback_model="llama")
    assert validate_spec(spec, KNOWN_MODELS) == [("name", "the auto model needs a name")]


def test_disabled_spec_keeps_its_routes_and_is_still_validated() -> None:
    """Disabling keeps the routes and their problems are still reported."""
    spec = AutoModelSpec(enabled=False, fallback_model="llama", routes={"code": "ghost"})
    assert spec.routes == {"code": "ghost"}
    assert validate_spec(spec, KNOWN_MODELS) == [
        ("routes.code", "'ghost' is not a configured model")
    ]
