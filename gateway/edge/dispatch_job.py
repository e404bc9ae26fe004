"""The dispatch job: what the dispatcher needs to send one routed request upstream and answer it.

Per provider tried, the job gives the body (the upstream model's name spliced in; a stream's
usage event asked for when usage is counted and the client did not ask, and taken out again),
the response headers (`x-gateway-affinity`, the auto model's choice, the key's concurrency
headers) and the renamer that makes answers name the public model. A stored response's node
that cannot be reached answers as gone for that response.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from urllib.parse import quote

from aiohttp import web

from gateway.catalog import Catalog, Key, Provider
from gateway.dispatch.dispatcher import Dispatcher
from gateway.dispatch.job import DispatchRecord, DispatchRequest, RequestBody
from gateway.dispatch.permits import KeyLimits, concurrency_headers
from gateway.dispatch.renamer import Renamer
from gateway.dispatch.usage import with_usage_requested
from gateway.edge.endpoints import RESPONSE_ID, ClientRequest, EndpointSpec
from gateway.edge.model_names import AnswerRenamer, ModelRenamer
from gateway.edge.model_resolution import Resolved
from gateway.edge.requestid import request_id_of
from gateway.edge.responses import ResponseBindings, node_gone, response_id
from gateway.edge.uploads import Upload
from gateway.selection.router import Router, RoutingDecision
from gateway.shared.errors import GatewayError

# A stored response's node failing with one of these is gone for that response.
UNREACHABLE = frozenset({"upstream_unreachable", "providers_cooling"})


class Jobs:
    """Builds dispatch jobs for routed requests and runs them through the dispatcher."""

    def __init__(
        self,
        catalog: Catalog,
        router: Router,
        dispatcher: Dispatcher,
        key_limits: KeyLimits,
        responses: ResponseBindings,
        *,
        counts_usage: bool,
    ) -> None:
        self.catalog = catalog
        self.router = router
        self.dispatcher = dispatcher
        self.key_limits = key_limits
        self.responses = responses
        # Off: no usage event is asked of streams.
        self._counts_usage = counts_usage

    def job(
        self,
        request: web.Request,
        *,
        spec: EndpointSpec,
        parsed: ClientRequest,
        resolved: Resolved | None,
        decision: RoutingDecision,
        key: Key,
        started_at: float,
        upload: Upload | None,
        storing: bool,
    ) -> DispatchRequest:
        """The job for one request routed by `decision`; `storing`: its answer's opening is
        recorded as a stored response of the key."""
        model = resolved.model if resolved is not None else None
        timeouts = self.catalog.timeouts(model or "")
        # A stream's usage event is asked for when the client did not ask (and taken out again).
        adds_usage = (
            self._counts_usage
            and parsed.stream
            and spec.fields in ("chat", "completions")
            and "stream_options" not in parsed.data
        )

        def strips_usage(provider: Provider) -> bool:
            return adds_usage and provider.stream_usage

        def body(provider: Provider) -> RequestBody:
            upstream = provider.upstream_models[model] if model is not None else None
            if upload is not None and upstream is not None:
                return upload.body_for(upstream)
            sent = parsed.body_for(upstream) if upstream is not None else None
            if sent is not None and strips_usage(provider):
                return with_usage_requested(sent)
            return sent

        async def on_answer(provider: Provider, opening: bytes | bytearray) -> None:
            if storing:
                await self.responses.record(key, provider, opening, parsed.stream)

        return DispatchRequest(
            request_id=request_id_of(request),
            key_id=key.id,
            method=spec.method,
            path=upstream_path(request, spec),
            body=body,
            # `GET /v1/responses/{id}?stream=true` replays a stored response as a stream.
            stream=parsed.stream or request.query.get("stream") == "true",
            timeouts=timeouts,
            client_headers=request.headers,
            response_headers=self._response_headers(decision, resolved, key),
            on_attempt=self.router.started,
            started_at=started_at,
            renamer=self._renamer(resolved),
            on_answer=on_answer,
            # A form's `stream` field may come after its file: the answer's type tells.
            stream_by_answer=upload is not None,
            replayable=(lambda: upload.source.replayable) if upload is not None else _always,
            body_failure=(lambda: upload.source.failure) if upload is not None else _no_failure,
            strips_usage=strips_usage,
        )

    async def dispatch(
        self,
        request: web.Request,
        job: DispatchRequest,
        *,
        decision: RoutingDecision,
        record: DispatchRecord,
        pinned: Provider | None,
        parsed: ClientRequest,
    ) -> web.StreamResponse:
        """The answer from the first provider of the failover list that gives one; a stored
        response's node that cannot be reached is gone for this response (404)."""
        try:
            return await self.dispatcher.dispatch(request, job, decision.failover, record)
        except GatewayError as error:
            if pinned is not None and error.code in UNREACHABLE:
                raise node_gone(response_id(request, parsed)) from None
            raise

    def _response_headers(
        self, decision: RoutingDecision, resolved: Resolved | None, key: Key
    ) -> Callable[[Provider], Mapping[str, str]]:
        """The gateway's own headers on an answer from a provider: its affinity, the auto
        model's choice, and the key's concurrency limit and what remains of it."""

        def headers(provider: Provider) -> Mapping[str, str]:
            values: dict[str, str] = {
                "x-gateway-affinity": self.router.affinity_header(decision, provider)
            }
            if resolved is not None and resolved.via_auto:
                values["x-gateway-resolved-model"] = resolved.model
            remaining = self.key_limits.remaining_concurrency(key)
            if key.max_concurrency is not None and remaining is not None:
                values.update(concurrency_headers(key.max_concurrency, remaining))
            return values

        return headers

    def _renamer(self, resolved: Resolved | None) -> Callable[[Provider], Renamer | None]:
        """Answers name the public model asked for (or the auto model's choice), unless the
        model keeps upstream ids."""

        def renamer(provider: Provider) -> Renamer | None:
            if resolved is None:
                public_names = {
                    upstream: public for public, upstream in provider.upstream_models.items()
                }
                return AnswerRenamer(public_names, self.catalog.keeps_upstream_ids)
            if self.catalog.keeps_upstream_ids(resolved.model):
                return None
            upstream = provider.upstream_models[resolved.model]
            return None if upstream == resolved.model else ModelRenamer(upstream, resolved.model)

        return renamer


def upstream_path(request: web.Request, spec: EndpointSpec) -> str:
    """The endpoint's path upstream (a stored response's id re-quoted as one path segment),
    with the client's query string as it sent it."""
    path = spec.path
    if RESPONSE_ID in request.match_info:
        path = path.format_map({RESPONSE_ID: quote(request.match_info[RESPONSE_ID], safe="")})
    query = request.rel_url.raw_query_string
    return f"{path}?{query}" if query else path


def _always() -> bool:
    return True


def _no_failure() -> GatewayError | None:
    return None
