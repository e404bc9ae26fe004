"""An org's `auto` virtual model: the request's mode picks the concrete model.

Resolution is exact route, then a one-way alias to another mode's route, then the fallback
model. A route whose target is not a valid model is an error, never a silent fallback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

DEFAULT_AUTO_MODEL_NAME = "auto"
DEFAULT_ALIASES: Mapping[str, str] = MappingProxyType({"build": "code", "plan": "architect"})
"""One-way: a `build` request uses the `code` route, never the other way round."""

MAX_MODE_LENGTH = 500
MAX_ROUTES = 100
MODE_SLUG = re.compile(r"[a-z0-9-]{1,50}")

ResolvedVia = Literal["route", "alias", "fallback"]


class AutoModelError(Exception):
    """The auto model cannot resolve this request; the message is safe to show the client."""


class AutoModelDisabled(AutoModelError):  # noqa: N818 - the name is the wiring contract
    """The org's auto model is disabled."""


class InvalidAutoRoute(AutoModelError):  # noqa: N818 - the name is the wiring contract
    """The chosen route or the fallback points to a model that cannot serve the request."""


@dataclass(frozen=True, slots=True)
class AutoModelSpec:
    """An org's auto model: its name, mode routes, one-way aliases and fallback model."""

    enabled: bool
    name: str = DEFAULT_AUTO_MODEL_NAME
    fallback_model: str = ""
    routes: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=lambda: DEFAULT_ALIASES)


@dataclass(frozen=True, slots=True)
class Resolution:
    """The concrete model for a request, how it was reached, and the mode that reached it."""

    model: str
    via: ResolvedVia
    mode: str | None = None


def normalize_mode(raw: str | None) -> str | None:
    """Return the mode header trimmed, lower-cased and cut to 500 characters; blank gives None."""
    if raw is None:
        return None
    mode = raw.strip().lower()[:MAX_MODE_LENGTH]
    return mode or None


def resolve(
    spec: AutoModelSpec, mode: str | None, *, is_valid_model: Callable[[str], bool]
) -> Resolution:
    """Pick the model for `mode`: exact route, then alias, then fallback; raise when invalid."""
    if not spec.enabled:
        raise AutoModelDisabled(f"the '{spec.name}' model is disabled for this organization")
    mode = normalize_mode(mode)
    if mode is not None:
        target = spec.routes.get(mode)
        if target is not None:
            _check_route(spec, mode, target, is_valid_model)
            return Resolution(target, "route", mode)
        aliased_mode = spec.aliases.get(mode)
        if aliased_mode is not None:
            target = spec.routes.get(aliased_mode)
            if target is not None:
                _check_route(spec, aliased_mode, target, is_valid_model)
                return Resolution(target, "alias", mode)
    fallback = spec.fallback_model
    if not fallback or fallback == spec.name or not is_valid_model(fallback):
        raise InvalidAutoRoute(
            f"the fallback model '{fallback}' of '{spec.name}' is not an available model"
        )
    return Resolution(fallback, "fallback", mode)


def _check_route(
    spec: AutoModelSpec, mode: str, target: str, is_valid_model: Callable[[str], bool]
) -> None:
    """Raise `InvalidAutoRoute` unless the route's target is a valid model other than `auto`."""
    if target == spec.name or not is_valid_model(target):
        raise InvalidAutoRoute(
            f"the '{mode}' route of '{spec.name}' points to '{target}', "
            "which is not an available model"
        )


def validate_spec(spec: AutoModelSpec, known_models: Collection[str]) -> list[tuple[str, str]]:
    """Return every problem as (path suffix, message); checked whether or not it is enabled."""
    problems: list[tuple[str, str]] = []
    if not spec.name:
        problems.append(("name", "the auto model needs a name"))
    if len(spec.routes) > MAX_ROUTES:
        problems.append(("routes", f"at most {MAX_ROUTES} routes, got {len(spec.routes)}"))
    for mode, target in spec.routes.items():
        path = f"routes.{mode}"
        if not MODE_SLUG.fullmatch(mode):
            problems.append((path, _slug_message(mode)))
        problems.extend((path, message) for message in _target_problems(spec, target, known_models))
    problems.extend(
        ("fallback_model", message)
        for message in _target_problems(spec, spec.fallback_model, known_models)
    )
    for mode, aliased_mode in spec.aliases.items():
        path = f"aliases.{mode}"
        if not MODE_SLUG.fullmatch(mode):
            problems.append((path, _slug_message(mode)))
        if not MODE_SLUG.fullmatch(aliased_mode):
            problems.append((path, _slug_message(aliased_mode)))
        # A default alias whose mode has no route is simply inactive, not a mistake.
        elif aliased_mode not in spec.routes and DEFAULT_ALIASES.get(mode) != aliased_mode:
            problems.append((path, f"alias target '{aliased_mode}' is not a route mode"))
    return problems


def _target_problems(spec: AutoModelSpec, target: str, known_models: Collection[str]) -> list[str]:
    """Return what is wrong with `target` as a route or fallback model, if anything."""
    if not target:
        return ["a target model is required"]
    if target == spec.name:
        return [f"may not point to the auto model '{spec.name}' itself"]
    if target not in known_models:
        return [f"'{target}' is not a configured model"]
    return []


def _slug_message(mode: str) -> str:
    """Describe a mode that is not a valid slug."""
    return f"mode '{mode}' must match ^[a-z0-9-]{{1,50}}$"
