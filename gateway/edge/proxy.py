"""The request handler: authenticate → admit → parse → resolve → candidates → order → dispatch →
record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import structlog
from aiohttp import HttpVersion11, web

from gateway.catalog import Catalog, Key, Provider
from gateway.dispatch.delivery import deliver
from gateway.dispatch.dispatcher import Dispatcher
from gateway.dispatch.job import DispatchRecord, DispatchRequest, RequestBody
from gateway.dispatch.memory_budget import MemoryBudget, Reservation
from gateway.dispatch.model_cards import ModelCards, model_object
from gateway.dispatch.permits import ConnectionShare, KeyLimits, concurrency_headers
from gateway.dispatch.renamer import Renamer
from gateway.dispatch.usage import with_usage_requested
from gateway.dispatch.usage_book import UsageBook
from gateway.edge.body_parse import read_request
from gateway.edge.connections import body_read_timeout, close_after_response
from gateway.edge.endpoints import RESPONSE_ID, ClientRequest, EndpointSpec
from gateway.edge.model_names import AnswerRenamer, ModelRenamer
from gateway.edge.overload import LoadShedder
from gateway.edge.request_body import IDENTITY, check_encoding, content_encoding, decode_body
from gateway.edge.request_log import RequestMetrics, record_request
from gateway.edge.requestid import request_id_of
from gateway.edge.responses import ResponseBindings, node_gone
from gateway.edge.uploads import REPLAY_CAP_BYTES, Upload, open_upload, too_large
from gateway.routing.automodel import (
    AutoModelDisabled,
    InvalidAutoRoute,
    normalize_mode,
    resolve,
)
from gateway.routing.conversations import conversation_of
from gateway.routing.sessions import session_id_from
from gateway.selection.router import RequestContext, Router, RoutingDecision
from gateway.shared.decisions import RECENT_DECISIONS, RecentDecisions
from gateway.shared.errors import GatewayError, is_utf8
from gateway.shared.metrics import Metrics

logger = structlog.get_logger("gateway.edge.proxy")


# nginx's convention for "the client closed the connection before the answer was complete".
CLIENT_CLOSED_REQUEST = 499

# Client headers that carry the key, in the order they are looked at.
KEY_HEADERS = ("api-key", "x-api-key")


@dataclass(frozen=True)
class Resolved:
    """The concrete model a request will use, and whether the org's auto model chose it."""

    model: str
    via_auto: bool


def routing_context(
    catalog: Catalog,
    spec: EndpointSpec,
    *,
    request_id: str,
    key: Key,
    model: str | None,
    stream: bool,
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    pinned: bool,
    known_head: tuple[int, bytes | None] | None = None,
) -> RequestContext:
    """What the router routes a request by. Only a sticky endpoint (chat, completions) of a
    sticky model reads a session id or computes the conversation's digest: embeddings,
    tokenize and the other least-loaded endpoints, and requests pinned to a stored response,
    never do the work. `known_head`: the conversation's stable head, when the body's parse
    already took it (a costly body parsed in the helper process)."""
    sticky = model is not None and spec.stickiness != "none" and not pinned
    stickiness = catalog.stickiness(model) if sticky and model is not None else "none"
    conversation = None
    if stickiness == "shared" and model is not None:
        conversation = conversation_of(
            body,
            headers,
            scope=catalog.affinity_scope(model),
            deployment_secret=catalog.conversation_secret,
            key_digest=key.digest,
            head_bytes=catalog.conversation_head_bytes,
            known_head=known_head,
        )
    return RequestContext(
        request_id=request_id,
        key=key,
        model=model or "",
        stream=stream,
        session_id=session_id_from(headers, body) if stickiness == "session" else None,
        conversation=conversation,
    )


class Proxy:
    """Owns the per-process pieces a request passes through and answers proxied requests."""

    def __init__(
        self,
        catalog: Catalog,
        router: Router,
        dispatcher: Dispatcher,
        metrics: Metrics,
        *,
        responses: ResponseBindings,
        max_body_bytes: int,
        mode_header: str,
        connections_per_key: ConnectionShare,
        key_limits: KeyLimits | None = None,
        recent: RecentDecisions | None = None,
        request_compression: bool = False,
        write_timeout: float = 60.0,
        memory_budget: MemoryBudget | None = None,
        shedder: LoadShedder | None = None,
        usage_book: UsageBook | None = None,
        model_cards: ModelCards | None = None,
    ) -> None:
        self.catalog = catalog
        self.responses = responses
        self.router = router
        self.dispatcher = dispatcher
        self.metrics = metrics
        self._request_metrics = RequestMetrics(metrics)
        # Given when a reload builds a new proxy: counts and history carry over.
        self.key_limits = key_limits or KeyLimits()
        self._connections_per_key = connections_per_key
        self.recent = recent if recent is not None else RecentDecisions(RECENT_DECISIONS)
        self._max_body_bytes = max_body_bytes
        self._mode_header = mode_header
        self._request_compression = request_compression
        self._write_timeout = write_timeout
        self.memory_budget = memory_budget
        self.shedder = shedder
        # None: usage accounting is off (no book, no usage asked of streams).
        self.usage_book = usage_book
        self.model_cards = model_cards

    def authenticate(self, request: web.BaseRequest) -> Key:
        """The key of a `Bearer` Authorization header (or an `api-key` / `x-api-key` header),
        or a 401."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if not token:
            token = next(
                (value.strip() for name in KEY_HEADERS if (value := request.headers.get(name))),
                "",
            )
        if not token:
            raise GatewayError(
                401,
                "Missing API key: send `Authorization: Bearer <key>` (or an `api-key` header).",
                "missing_api_key",
            )
        key = self.catalog.authenticate(token) if is_utf8(token) else None
        if key is None:
            raise GatewayError(401, "Invalid API key.", "invalid_api_key")
        return key

    async def expect_continue(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: the key, the declared size and the body's coding are checked
        before the handler runs; on failure the error, and the connection closes. `100 Continue`
        itself is sent by the handler once the key's limits admitted the request."""
        try:
            if request.headers.get("Expect", "").lower() != "100-continue":
                raise GatewayError(
                    417, "Only `Expect: 100-continue` is supported.", "expectation_failed"
                )
            self.authenticate(request)
            encoding = content_encoding(request.headers.get("Content-Encoding"))
            check_encoding(encoding, allowed=self._request_compression)
            length = request.content_length
            if length is not None and length > self._max_body_bytes:
                raise too_large(self._max_body_bytes)
        except GatewayError as error:
            close_after_response(request)
            return error.to_response({"x-request-id": request_id_of(request)})
        return None

    def is_light(self, request: web.BaseRequest) -> bool:
        """Whether the request's key has fewer requests in flight on this worker than the mean
        of the keys that have some (False without a valid key): load shedding spares it more."""
        try:
            key = self.authenticate(request)
        except GatewayError:
            return False
        return self.key_limits.below_mean(key)

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`: the models this key may use, in vLLM's list shape (with the
        context length its nodes report)."""
        key = self.authenticate(request)
        data = await self._model_objects(key, self.catalog.models_for(key))
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{id}`: one model this key may use, or a 404."""
        key = self.authenticate(request)
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

    def _response_headers(
        self, decision: RoutingDecision, resolved: Resolved | None, key: Key
    ) -> Callable[[Provider], Mapping[str, str]]:
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

    async def _read_body(self, request: web.Request, memory: Reservation | None) -> bytes:
        """The whole body: 413 past `max_body_bytes`, 408 when it is not all there in time;
        each piece counted in the worker's memory budget before it is kept (a declared length
        at once, before any is read), 503/429 past it."""
        encoding = content_encoding(request.headers.get("Content-Encoding"))
        check_encoding(encoding, allowed=self._request_compression)
        length = request.content_length
        if length is not None and length > self._max_body_bytes:
            raise too_large(self._max_body_bytes)
        take = _taker(request, memory)
        if take is not None and encoding in IDENTITY and length is not None:
            take(length)
            take = None  # the declared length is held: the pieces are within it
        timeout = body_read_timeout(request)
        pieces = _pieces(request, self._max_body_bytes, take)
        try:
            if encoding in IDENTITY and request.content.is_eof():
                # The whole body came with the head: nothing to wait for, no deadline to arm.
                return await _gather(pieces)
            async with asyncio.timeout(timeout):
                if encoding in IDENTITY:
                    return await _gather(pieces)
                return await decode_body(pieces, encoding, self._max_body_bytes, take)
        except web.HTTPRequestEntityTooLarge:
            raise too_large(self._max_body_bytes) from None
        except TimeoutError:
            # The rest of the body is not worth waiting for: close once the 408 is out.
            close_after_response(request)
            raise GatewayError(
                408,
                f"The request body did not arrive within {timeout:g} s.",
                "body_timeout",
                headers={"Connection": "close"},
            ) from None

    def _resolve(self, request: web.Request, key: Key, requested: str) -> Resolved:
        spec = self.catalog.auto_model(key)
        if spec is not None and requested == spec.name:
            if not key.allows(requested):
                raise GatewayError(
                    403, f"This key may not use the model `{requested}`.", "model_not_allowed"
                )
            mode = normalize_mode(request.headers.get(self._mode_header))
            try:
                resolution = resolve(spec, mode, is_valid_model=self.catalog.serves)
            except AutoModelDisabled as error:
                raise GatewayError(400, str(error), "auto_model_disabled") from None
            except InvalidAutoRoute as error:
                raise GatewayError(400, str(error), "invalid_auto_route") from None
            model = resolution.model
            via_auto = True
        else:
            model = requested
            via_auto = False
        if not self.catalog.serves(model):
            raise GatewayError(
                404, f"The model `{model[:200]}` does not exist.", "model_not_found", param="model"
            )
        if not key.allows(model):
            raise GatewayError(
                403, f"This key may not use the model `{model}`.", "model_not_allowed"
            )
        return Resolved(model=model, via_auto=via_auto)

    async def proxy(self, request: web.Request, spec: EndpointSpec) -> web.StreamResponse:
        """Proxy one request to an endpoint of the table."""
        started_at = time.monotonic()
        request_id = request_id_of(request)
        record = DispatchRecord()
        key: Key | None = None
        admitted: Key | None = None
        affinity = "none"
        route: list[str] = []
        parsed: ClientRequest | None = None
        resolved: Resolved | None = None
        upload: Upload | None = None
        status = 500
        try:
            # The key's limits are taken as soon as its head is in: a body that trickles in
            # holds a connection, so it counts from here (and a refusal needs no body).
            try:
                key = self.authenticate(request)
                await self.key_limits.admit(key, self._connections_per_key)
                admitted = key
                if self.memory_budget is not None:
                    record.buffer = self.memory_budget.reservation(key.id)
            except GatewayError:
                # A body nobody will read is not waited for: close once the refusal is out.
                if not request.content.is_eof():
                    close_after_response(request)
                raise
            if spec.body != "none":
                await _ask_for_body(request)
            if spec.body == "multipart":
                upload = await open_upload(
                    request,
                    max_body_bytes=self._max_body_bytes,
                    replay_cap=REPLAY_CAP_BYTES,
                    memory=record.buffer,
                )
                parsed = upload.request
            else:
                raw = await self._read_body(request, record.buffer) if spec.body != "none" else b""
                parsed = await read_request(spec, raw, self.catalog.conversation_head_bytes)
            pinned = await self._pinned_provider(request, spec, parsed, key)
            storing = spec.stores_responses and await self.responses.admit(key, parsed.data)
            requested = parsed.model
            if requested is None and spec.model_optional:
                requested = self._default_model(key)
            if requested is not None:
                resolved = self._resolve(request, key, requested)
                candidates = self.catalog.candidates(key, resolved.model)
                if not candidates and self.catalog.only_draining(key, resolved.model):
                    raise GatewayError(
                        503,
                        f"Every provider for `{resolved.model}` is draining; try again shortly.",
                        "providers_draining",
                        retry_after=1,
                    )
            else:
                assert pinned is not None  # a request without a model names a stored response
                candidates = (pinned,)
            if pinned is not None and pinned not in candidates:
                raise node_gone(_response_id(request, parsed))
            if not candidates:
                asked = resolved.model if resolved else ""
                raise GatewayError(
                    404,
                    f"No provider on this key's route serves `{asked}`.",
                    "model_not_found",
                    param="model",
                )
            model = resolved.model if resolved is not None else None
            context = routing_context(
                self.catalog,
                spec,
                request_id=request_id,
                key=key,
                model=model,
                stream=parsed.stream,
                headers=request.headers,
                body=parsed.data,
                pinned=pinned is not None,
                known_head=parsed.known_head,
            )
            decision = await self._decide(spec, context, candidates, pinned)
            affinity = decision.affinity
            route = [
                f"{provider.name}:{reason}"
                for provider, reason in zip(decision.failover, decision.reasons, strict=True)
            ]
            job = self._job(
                request,
                spec=spec,
                parsed=parsed,
                resolved=resolved,
                decision=decision,
                key=key,
                started_at=started_at,
                upload=upload,
                storing=storing,
            )
            response = await self._dispatch(
                request, job, decision=decision, record=record, pinned=pinned, parsed=parsed
            )
            served = record.served
            routed = pinned is None and spec.stickiness != "none"
            if served is not None and record.succeeded and routed:
                self.router.succeeded(context, decision, served, record.upstream_ttft_seconds)
                affinity = self.router.affinity_header(decision, served)
            status = response.status
            # A whole answer is sent here, within the write deadline: a client that does not
            # read is dropped.
            if not await deliver(request, response, self._write_timeout):
                status = CLIENT_CLOSED_REQUEST
                record.client_disconnected = True
            return response
        except GatewayError as error:
            status = error.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            record.client_disconnected = True
            raise
        finally:
            if upload is not None:
                upload.source.close()
            if record.buffer is not None:
                record.buffer.release()
            if admitted is not None:
                self.key_limits.release(admitted)
            record_request(
                self._request_metrics,
                self.recent,
                request_id=request_id,
                affinity=affinity,
                route=route,
                key=key,
                requested=parsed.model if parsed else None,
                model=resolved.model if resolved else None,
                names_no_model=spec.body == "none",
                record=record,
                status=status,
                started_at=started_at,
                usage_book=self.usage_book,
            )

    def _default_model(self, key: Key) -> str:
        """The model for a body that may leave `model` out and did: the key's default."""
        model = self.catalog.default_model(key)
        if model is None:
            raise GatewayError(
                404, "No model is available to this key.", "model_not_found", param="model"
            )
        return model

    async def _pinned_provider(
        self, request: web.Request, spec: EndpointSpec, parsed: ClientRequest, key: Key
    ) -> Provider | None:
        """For a stored response's follow-up, the node that holds it."""
        if spec.stickiness != "response":
            return None
        response_id = _response_id(request, parsed)
        return await self.responses.provider_of(key, response_id) if response_id else None

    async def _decide(
        self,
        spec: EndpointSpec,
        context: RequestContext,
        candidates: tuple[Provider, ...],
        pinned: Provider | None,
    ) -> RoutingDecision:
        """The failover list: the stored response's node alone; the least-loaded providers for
        endpoints without stickiness; else the router's decision for the model."""
        if pinned is not None:
            return RoutingDecision(failover=[pinned], reasons=["stored-response"], affinity="hit")
        if spec.stickiness == "none":
            ordered = sorted(
                candidates,
                key=lambda provider: (
                    self.router.health.cooling(provider.name),
                    self.router.load(provider.name),
                    self.router.starts.last_started(provider.routing_identity) or 0.0,
                ),
            )
            return RoutingDecision(
                failover=ordered, reasons=["least-loaded"] * len(ordered), affinity="none"
            )
        return await self.router.decide(context, candidates)

    def _job(
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
        model = resolved.model if resolved is not None else None
        timeouts = self.catalog.timeouts(model or "")
        # A stream's usage event is asked for when the client did not ask (and taken out again).
        adds_usage = (
            self.usage_book is not None
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
            path=_upstream_path(request, spec),
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

    async def _dispatch(
        self,
        request: web.Request,
        job: DispatchRequest,
        *,
        decision: RoutingDecision,
        record: DispatchRecord,
        pinned: Provider | None,
        parsed: ClientRequest,
    ) -> web.StreamResponse:
        try:
            return await self.dispatcher.dispatch(request, job, decision.failover, record)
        except GatewayError as error:
            # A stored response's node that cannot be reached is gone for this response.
            unreachable = {"upstream_unreachable", "providers_cooling"}
            if pinned is not None and error.code in unreachable:
                raise node_gone(_response_id(request, parsed)) from None
            raise


def _upstream_path(request: web.Request, spec: EndpointSpec) -> str:
    """The endpoint's path upstream (a stored response's id re-quoted as one path segment),
    with the client's query string as it sent it."""
    path = spec.path
    if RESPONSE_ID in request.match_info:
        path = path.format_map({RESPONSE_ID: quote(request.match_info[RESPONSE_ID], safe="")})
    query = request.rel_url.raw_query_string
    return f"{path}?{query}" if query else path


async def _ask_for_body(request: web.Request) -> None:
    """Send `100 Continue` to a client that waits for it before sending its body."""
    expects = request.headers.get("Expect", "").lower() == "100-continue"
    if expects and request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # Not the response: errors after this still get a whole answer of their own.
        request.writer.output_size = 0


async def _pieces(
    request: web.Request, limit: int, take: Callable[[int], None] | None
) -> AsyncIterator[bytes]:
    """The body as it arrives, undecoded: 413 past `limit` bytes received; each piece counted
    by `take` (the memory budget) before it is passed on."""
    received = 0
    async for piece in request.content.iter_any():
        received += len(piece)
        if received > limit:
            close_after_response(request)
            raise too_large(limit, close=True)
        if take is not None:
            take(len(piece))
        yield piece


async def _gather(pieces: AsyncIterator[bytes]) -> bytes:
    """A body's pieces, joined (one piece: as it came)."""
    gathered = [piece async for piece in pieces]
    return gathered[0] if len(gathered) == 1 else b"".join(gathered)


def _taker(request: web.Request, memory: Reservation | None) -> Callable[[int], None] | None:
    """Counts a request body's bytes in the memory budget; a refusal closes the connection (the
    rest of the body is not read)."""
    if memory is None:
        return None

    def take(size: int) -> None:
        try:
            memory.take_now("request_body", size)
        except GatewayError:
            close_after_response(request)
            raise

    return take


def _response_id(request: web.Request, parsed: ClientRequest) -> str:
    """The stored response a request continues: its path's id, or `previous_response_id`."""
    return request.match_info.get(RESPONSE_ID) or parsed.previous_response_id or ""


def _always() -> bool:
    return True


def _no_failure() -> GatewayError | None:
    return None
