"""`GET /v1/models` and `GET /v1/models/{id}`: the models a key may use, in vLLM's list shape,
with what their providers' nodes report (the context length)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from gateway.catalog import Catalog, Key
from gateway.dispatch.model_cards import ModelCards, model_object
from gateway.shared.errors import GatewayError


class ModelList:
    """Answers the model list endpoints for authenticated keys."""

    def __init__(
        self,
        catalog: Catalog,
        authenticate: Callable[[web.BaseRequest], Key],
        model_cards: ModelCards | None,
    ) -> None:
        self.catalog = catalog
        self._authenticate = authenticate
        self.model_cards = model_cards

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`: the models this key may use, in vLLM's list shape (with the
        context length its nodes report)."""
        key = self._authenticate(request)
        data = await self._model_objects(key, self.catalog.models_for(key))
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{id}`: one model this key may use, or a 404."""
        key = self._authenticate(request)
        name = request.match_info["model"]
        if name not in self.catalog.models_for(key):
            raise GatewayError(
                404, f"The model `{name[:200]}` does not exist.", "model_not_found", param="model"
            )
        return web.json_response((await self._model_objects(key, [name]))[0])

    async def _model_objects(self, key: Key, names: Sequence[str]) -> list[dict[str, Any]]:
        """The entries for these public models, with what their providers' nodes report."""
        serving = {name: self.catalog.candidates(key, name) for name in names}
        providers = {provider.name: provider for found in serving.values() for provider in found}
        cards = await self.model_cards.of(providers.values()) if self.model_cards else {}
        return [model_object(name, serving[name], cards) for name in names]
