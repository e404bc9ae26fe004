"""Read a YAML config: `${VAR}` interpolation, validation, every problem reported at once."""

from __future__ import annotations

import ipaddress
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from gateway.config import Settings
from gateway.config_fleet import KeySettings, ModelSettings, OrgSettings, ProviderSettings
from gateway.config_service import REPLACED_SHEDDING_SETTINGS
from gateway.routing.automodel import validate_spec

ModelT = TypeVar("ModelT", bound=BaseModel)

# `check-config` warns about an admin token shorter than this.
MIN_ADMIN_TOKEN_CHARACTERS = 24
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Problem:
    """One finding in a config file, located by its path (e.g. `providers[1].url`)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(Exception):
    """The config is invalid; `problems` lists every error found, each with its path."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclass(frozen=True)
class LoadedConfig:
    """Valid settings plus the warnings that do not stop the gateway."""

    settings: Settings
    warnings: list[Problem]


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read, interpolate and validate a config file; raise ConfigError listing every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([Problem("(file)", f"cannot read {path}: {error.strerror}")]) from None
    return parse_config(text, os.environ if environ is None else environ)


def parse_config(text: str, environ: Mapping[str, str]) -> LoadedConfig:
    """Validate YAML text; raise ConfigError listing every problem found, never a secret's value."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        reason = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError([Problem(where, str(reason))]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem("(root)", "the config must be a mapping of sections")])

    problems: list[Problem] = []
    data = _interpolate(raw, "", environ, problems)
    retired = _retired_settings(data)
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as error:
        # A missing variable already explains whatever its empty stand-in then fails.
        unset = {problem.path for problem in problems}
        problems.extend(
            problem for problem in _problems_from(error, prefix="") if problem.path not in unset
        )

    # Cross-references are checked over whatever items validated on their own, so a file with
    # both a malformed field and a dangling reference reports both in one run.
    parts = settings or _partial(data)
    cross_errors, warnings = _cross_check(parts)
    problems.extend(cross_errors)
    if problems or settings is None:
        raise ConfigError(problems)
    warnings.extend(retired)
    warnings.extend(security_warnings(settings))
    return LoadedConfig(settings=_with_database_url(settings, environ), warnings=warnings)


def _retired_settings(data: dict[str, Any]) -> list[Problem]:
    """Take settings of earlier builds out of `data`, each with a warning naming what replaced
    it: they no longer apply, and an upgrade must not stop a gateway over them."""
    server = data.get("server")
    if not isinstance(server, dict):
        return []
    found = sorted(REPLACED_SHEDDING_SETTINGS & server.keys())
    for name in found:
        del server[name]
    return [
        Problem(
            f"server.{name}",
            "retired and ignored: `load_shedding_burst_seconds` replaces it (how long a burst "
            "may queue without any refusal, default 1; only a queue that stands past it is shed)",
        )
        for name in found
    ]


def security_warnings(settings: Settings) -> list[Problem]:
    """Risky but valid settings: credentials in provider URLs, a provider key sent in clear to a
    host off this machine, an admin token short enough to guess."""
    warnings: list[Problem] = []
    for index, provider in enumerate(settings.providers):
        url = provider.url
        if url.username or url.password:
            warnings.append(
                Problem(
                    f"providers[{index}].url",
                    "the URL carries credentials; put the key in `api_key` (from a variable)",
                )
            )
        if provider.api_key is not None and url.scheme == "http" and not _loopback(url.host):
            warnings.append(
                Problem(
                    f"providers[{index}].api_key",
                    "sent over plain http to a host off this machine; use https",
                )
            )
    token = settings.server.admin_token
    if token is not None and len(token.get_secret_value()) < MIN_ADMIN_TOKEN_CHARACTERS:
        warnings.append(
            Problem(
                "server.admin_token",
                f"shorter than {MIN_ADMIN_TOKEN_CHARACTERS} characters; use a long random token",
            )
        )
    return warnings


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _with_database_url(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """An omitted or empty `database.url` means the DATABASE_URL variable, when it is set."""
    fallback = environ.get("DATABASE_URL", "")
    if settings.database.url is not None or not fallback:
        return settings
    database = settings.database.model_copy(update={"url": SecretStr(fallback)})
    return settings.model_copy(update={"database": database})


def _interpolate(value: Any, path: str, environ: Mapping[str, str], problems: list[Problem]) -> Any:
    if isinstance(value, str):
        return _substitute(value, path, environ, problems)
    if isinstance(value, dict):
        return {
            key: _interpolate(item, _join(path, str(key)), environ, problems)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            _interpolate(item, f"{path}[{index}]", environ, problems)
            for index, item in enumerate(value)
        ]
    return value


def _substitute(text: str, path: str, environ: Mapping[str, str], problems: list[Problem]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.append(Problem(path or "(root)", f"environment variable {name} is not set"))
        return ""

    return VARIABLE.sub(replace, text)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _problems_from(error: ValidationError, prefix: str) -> Iterator[Problem]:
    for detail in error.errors(include_input=False, include_url=False):
        path = prefix
        for part in detail["loc"]:
            path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
        message = str(detail["msg"]).removeprefix("Value error, ")
        yield Problem(path or "(root)", message)


@dataclass(frozen=True)
class _Parts:
    """The items of each list section that validated on their own, with their original index."""

    providers: list[tuple[int, ProviderSettings]]
    groups: dict[str, list[str]]
    models: list[tuple[int, ModelSettings]]
    orgs: list[tuple[int, OrgSettings]]
    keys: list[tuple[int, KeySettings]]


def _partial(data: dict[str, Any]) -> _Parts:
    groups = data.get("groups")
    valid_groups = (
        {
            str(name): [str(member) for member in members]
            for name, members in groups.items()
            if isinstance(members, list)
        }
        if isinstance(groups, dict)
        else {}
    )
    return _Parts(
        providers=_valid_items(data.get("providers"), ProviderSettings),
        groups=valid_groups,
        models=_valid_items(data.get("models"), ModelSettings),
        orgs=_valid_items(data.get("orgs"), OrgSettings),
        keys=_valid_items(data.get("keys"), KeySettings),
    )


def _valid_items(items: Any, model: type[ModelT]) -> list[tuple[int, ModelT]]:
    if not isinstance(items, list):
        return []
    valid: list[tuple[int, ModelT]] = []
    for index, item in enumerate(items):
        try:
            valid.append((index, model.model_validate(item)))
        except ValidationError:
            continue
    return valid


def _cross_check(parts: Settings | _Parts) -> tuple[list[Problem], list[Problem]]:
    if isinstance(parts, Settings):
        parts = _Parts(
            providers=list(enumerate(parts.providers)),
            groups=dict(parts.groups),
            models=list(enumerate(parts.models)),
            orgs=list(enumerate(parts.orgs)),
            keys=list(enumerate(parts.keys)),
        )
    errors: list[Problem] = []
    warnings: list[Problem] = []

    provider_names = {provider.name for _, provider in parts.providers}
    errors += _duplicates("providers", "name", [(i, p.name) for i, p in parts.providers])
    errors += _duplicates("models", "name", [(i, m.name) for i, m in parts.models])
    errors += _duplicates("orgs", "name", [(i, o.name) for i, o in parts.orgs])
    errors += _duplicates("keys", "id", [(i, k.id) for i, k in parts.keys])
    errors += _duplicates("keys", "key_sha256", [(i, k.digest) for i, k in parts.keys])

    group_names = {p.group for _, p in parts.providers if p.group is not None} | set(parts.groups)
    for group, members in parts.groups.items():
        for position, member in enumerate(members):
            if member not in provider_names:
                errors.append(
                    Problem(f"groups.{group}[{position}]", f"unknown provider {member!r}")
                )

    served = {model for _, provider in parts.providers for model in provider.models}
    for index, model in parts.models:
        if model.name not in served:
            errors.append(Problem(f"models[{index}].name", f"no provider serves {model.name!r}"))

    auto_names: dict[str, str] = {}
    for index, org in parts.orgs:
        if org.auto_model is None:
            continue
        for suffix, message in validate_spec(org.auto_model.spec(), served):
            errors.append(Problem(_join(f"orgs[{index}].auto_model", suffix), message))
        if org.auto_model.name in served:
            errors.append(
                Problem(
                    f"orgs[{index}].auto_model.name",
                    f"{org.auto_model.name!r} is also a real model; pick another name",
                )
            )
        auto_names[org.name] = org.auto_model.name

    org_names = {org.name for _, org in parts.orgs}
    for index, key in parts.keys:
        where = f"keys[{index}]"
        if key.org is not None and key.org not in org_names:
            errors.append(Problem(f"{where}.org", f"unknown org {key.org!r}"))
        allowed_names = served | ({auto_names[key.org]} if key.org in auto_names else set())
        for position, model_name in enumerate(key.models):
            if model_name != "*" and model_name not in allowed_names:
                errors.append(
                    Problem(f"{where}.models[{position}]", f"unknown model {model_name!r}")
                )
        if key.route.group is not None and key.route.group not in group_names:
            errors.append(Problem(f"{where}.route.group", f"unknown group {key.route.group!r}"))
        if key.route.fixed is not None and key.route.fixed not in provider_names:
            errors.append(Problem(f"{where}.route.fixed", f"unknown provider {key.route.fixed!r}"))
        for model_name, group in key.model_group_preferences.items():
            path = f"{where}.model_group_preferences.{model_name}"
            if model_name not in served:
                errors.append(Problem(path, f"unknown model {model_name!r}"))
            elif group not in group_names:
                warnings.append(
                    Problem(path, f"group {group!r} does not exist; this preference is skipped")
                )
    return errors, warnings


def _duplicates(section: str, field: str, values: list[tuple[int, str]]) -> list[Problem]:
    counts = Counter(value for _, value in values)
    return [
        Problem(
            f"{section}[{index}].{field}",
            "duplicate value" if field == "key_sha256" else f"duplicate {field} {value!r}",
        )
        for index, value in values
        if counts[value] > 1
    ]
