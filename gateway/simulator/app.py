"""The simulator's aiohttp application: routes, the node header, `/v1/models` and `/metrics`."""

from __future__ import annotations

import time

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from gateway.simulator import control, extras, responses_api
from gateway.simulator.completions import chat_completions, completions
from gateway.simulator.metrics import metrics_registry, render_metrics
from gateway.simulator.openai_shapes import JSON_CONTENT_TYPE, model_card
from gateway.simulator.state import STATE_KEY, SimulatorState

NODE_HEADER = "x-simulator-node"
REGISTRY_KEY = web.AppKey("simulator_metrics_registry", CollectorRegistry)


def create_simulator_app(state: SimulatorState) -> web.Application:
    """Build the application serving `state`'s node."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    app[REGISTRY_KEY] = metrics_registry(state)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", extras.model)
    app.router.add_post("/v1/embeddings", extras.embeddings)
    app.router.add_post("/v1/rerank", extras.rerank)
    app.router.add_post("/v1/score", extras.score)
    app.router.add_post("/tokenize", extras.tokenize)
    app.router.add_post("/detokenize", extras.detokenize)
    app.router.add_post("/v1/audio/transcriptions", extras.transcriptions)
    app.router.add_post("/v1/responses", responses_api.create)
    app.router.add_get("/v1/responses/{response_id}", responses_api.retrieve)
    app.router.add_delete("/v1/responses/{response_id}", responses_api.delete)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/sim/faults", control.get_faults)
    app.router.add_post("/sim/faults", control.post_faults)
    app.router.add_get("/sim/stats", control.get_stats)
    app.router.add_post("/sim/reset", control.post_reset)
    app.on_response_prepare.append(_add_node_header)
    return app


async def _add_node_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[NODE_HEADER] = request.app[STATE_KEY].options.name


async def models(request: web.Request) -> web.Response:
    """`GET /v1/models`: the configured models, or, serving any model, those asked for so far."""
    state = request.app[STATE_KEY]
    state.stats.count_path(request.path)
    if state.options.models:
        started = int(time.time())
        listed = dict.fromkeys(state.options.models, started)
    else:
        listed = state.models_seen
    payload = {
        "object": "list",
        "data": [
            model_card(model, created, state.options.name) for model, created in listed.items()
        ],
    }
    return web.Response(body=orjson.dumps(payload), content_type=JSON_CONTENT_TYPE)


async def metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: vLLM-style metrics in the Prometheus text format."""
    request.app[STATE_KEY].stats.count_path(request.path)
    response = web.Response(body=render_metrics(request.app[REGISTRY_KEY]))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
