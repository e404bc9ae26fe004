"""The request handler: authenticate → admit → parse → resolve → candidates → order → dispatch →
record.

Each step lives in its own module of the edge; the `Proxy` owns the per-process pieces a request
passes through and runs one request through the steps in order. A request's key's limits are
released, its memory reservation and upload closed, and the request recorded (recent decisions,
metrics, one log line) however it ends; a client that leaves before its answer is complete is
recorded with status 499.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from gateway.catalog import Catalog, Key
from gateway.dispatch.delivery import deliver
from gateway.dispatch.dispatcher import Dispatcher
from gateway.dispatch.job import DispatchRecord
from gateway.dispatch.memory_budget import MemoryBudget
from gateway.dispatch.model_cards import ModelCards
from gateway.dispatch.permits import ConnectionShare, KeyLimits
from gateway.dispatch.usage_book import UsageBook
from gateway.edge.admission import Admission, ask_for_body, refused
from gateway.edge.body_parse import read_request
from gateway.edge.dispatch_job import Jobs
from gateway.edge.endpoints import ClientRequest, EndpointSpec
from gateway.edge.model_list import ModelList
from gateway.edge.model_resolution import Resolved, candidates_for, default_model, resolve_model
from gateway.edge.overload import LoadShedder
from gateway.edge.request_body import read_body
from gateway.edge.request_log import RequestMetrics, record_request
from gateway.edge.requestid import request_id_of
from gateway.edge.responses import ResponseBindings, node_gone, response_id
from gateway.edge.routing_context import decide, routing_context
from gateway.edge.uploads import REPLAY_CAP_BYTES, Upload, open_upload
from gateway.selection.router import Router
from gateway.shared.decisions import RECENT_DECISIONS, RecentDecisions
from gateway.shared.errors import GatewayError
from gateway.shared.metrics import Metrics

# nginx's convention for "the client closed the connection before the answer was complete".
CLIENT_CLOSED_REQUEST = 499


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
        self.recent = recent if recent is not None else RecentDecisions(RECENT_DECISIONS)
        self._max_body_bytes = max_body_bytes
        self._mode_header = mode_header
        self._request_compression = request_compression
        self._write_timeout = write_timeout
        self.memory_budget = memory_budget
        self.shedder = shedder
        # None: usage accounting is off (no book, no usage asked of streams).
        self.usage_book = usage_book
        self.admission = Admission(
            catalog,
            self.key_limits,
            connections_per_key=connections_per_key,
            max_body_bytes=max_body_bytes,
            request_compression=request_compression,
            memory_budget=memory_budget,
        )
        self.model_list = ModelList(catalog, self.admission.authenticate, model_cards)
        self.jobs = Jobs(
            catalog,
            router,
            dispatcher,
            self.key_limits,
            responses,
            counts_usage=usage_book is not None,
        )

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
                key = self.admission.authenticate(request)
                await self.admission.admit(key, record)
                admitted = key
            except GatewayError:
                refused(request)
                raise
            if spec.body != "none":
                await ask_for_body(request)
            if spec.body == "multipart":
                upload = await open_upload(
                    request,
                    max_body_bytes=self._max_body_bytes,
                    replay_cap=REPLAY_CAP_BYTES,
                    memory=record.buffer,
                )
                parsed = upload.request
            else:
                raw = (
                    await read_body(
                        request,
                        record.buffer,
                        max_body_bytes=self._max_body_bytes,
                        request_compression=self._request_compression,
                    )
                    if spec.body != "none"
                    else b""
                )
                parsed = await read_request(spec, raw, self.catalog.conversation_head_bytes)
            pinned = await self.responses.pinned(request, spec, parsed, key)
            storing = spec.stores_responses and await self.responses.admit(key, parsed.data)
            requested = parsed.model
            if requested is None and spec.model_optional:
                requested = default_model(self.catalog, key)
            if requested is not None:
                resolved = resolve_model(
                    self.catalog, key, requested, request.headers, self._mode_header
                )
                candidates = candidates_for(self.catalog, key, resolved.model)
            else:
                assert pinned is not None  # a request without a model names a stored response
                candidates = (pinned,)
            if pinned is not None and pinned not in candidates:
                raise node_gone(response_id(request, parsed))
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
            decision = await decide(self.router, spec, context, candidates, pinned)
            affinity = decision.affinity
            route = [
                f"{provider.name}:{reason}"
                for provider, reason in zip(decision.failover, decision.reasons, strict=True)
            ]
            job = self.jobs.job(
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
            response = await self.jobs.dispatch(
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
