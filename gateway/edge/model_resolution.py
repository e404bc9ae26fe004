"""Model resolution: the concrete model a request will use, and the providers that serve it.

A model the org's auto model names is resolved by the routing mode header; any other model is
taken as asked. An unknown model gets 404, one the key may not use 403; a body that may leave
`model` out and did gets the key's default model. A model whose providers on the key's route are
all draining gets 503.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.catalog import Catalog, Key, Provider
from gateway.routing.automodel import AutoModelDisabled, InvalidAutoRoute, normalize_mode, resolve
from gateway.shared.errors import GatewayError


@dataclass(frozen=True)
class Resolved:
    """The concrete model a request will use, and whether the org's auto model chose it."""

    model: str
    via_auto: bool


def resolve_model(
    catalog: Catalog, key: Key, requested: str, headers: Mapping[str, str], mode_header: str
) -> Resolved:
    """The model `requested` stands for on this key: the auto model's choice for the mode
    `mode_header` names, or itself; 400 for an auto route that cannot be taken, 404 for a model
    nobody serves, 403 for one the key may not use."""
    spec = catalog.auto_model(key)
    if spec is not None and requested == spec.name:
        if not key.allows(requested):
            raise GatewayError(
                403, f"This key may not use the model `{requested}`.", "model_not_allowed"
            )
        mode = normalize_mode(headers.get(mode_header))
        try:
            resolution = resolve(spec, mode, is_valid_model=catalog.serves)
        except AutoModelDisabled as error:
            raise GatewayError(400, str(error), "auto_model_disabled") from None
        except InvalidAutoRoute as error:
            raise GatewayError(400, str(error), "invalid_auto_route") from None
        model = resolution.model
        via_auto = True
    else:
        model = requested
        via_auto = False
    if not catalog.serves(model):
        raise GatewayError(
            404, f"The model `{model[:200]}` does not exist.", "model_not_found", param="model"
        )
    if not key.allows(model):
        raise GatewayError(403, f"This key may not use the model `{model}`.", "model_not_allowed")
    return Resolved(model=model, via_auto=via_auto)


def default_model(catalog: Catalog, key: Key) -> str:
    """The model for a body that may leave `model` out and did: the key's default (404 when the
    key has none)."""
    model = catalog.default_model(key)
    if model is None:
        raise GatewayError(
            404, "No model is available to this key.", "model_not_found", param="model"
        )
    return model


def candidates_for(catalog: Catalog, key: Key, model: str) -> tuple[Provider, ...]:
    """The providers on the key's route serving `model`; 503 when every one is draining."""
    candidates = catalog.candidates(key, model)
    if not candidates and catalog.only_draining(key, model):
        raise GatewayError(
            503,
            f"Every provider for `{model}` is draining; try again shortly.",
            "providers_draining",
            retry_after=1,
        )
    return candidates
