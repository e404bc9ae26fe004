"""What the nodes' own `/v1/models` say about each upstream model (vLLM's `max_model_len`,
`parent`), fetched when a client lists models and kept a while, so `GET /v1/models` through the
gateway carries the context length tools read from it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog

from gateway.catalog import Provider

logger = structlog.get_logger("gateway.dispatch.model_cards")

# A node's list is fetched again after this long (a node's models change only when it restarts).
CARDS_TTL_SECONDS = 60.0
# A node that did not answer is asked again after this long, not on every listing.
FAILED_RETRY_SECONDS = 5.0
FETCH_TIMEOUT_SECONDS = 2.0
MAX_LIST_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ModelCard:
    """One upstream model as its node describes it."""

    max_model_len: int | None
    parent: str | None


@dataclass(frozen=True)
class _Fetched:
    cards: Mapping[str, ModelCard]  # by upstream model id
    at: float
    ok: bool


def parse_cards(body: bytes) -> dict[str, ModelCard]:
    """The cards of an OpenAI-style model list (`{"data": [{"id", "max_model_len", ...}]}`);
    entries or fields of the wrong shape are left out."""
    document = orjson.loads(body)
    entries = document.get("data") if isinstance(document, dict) else None
    cards: dict[str, ModelCard] = {}
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        length = entry.get("max_model_len")
        parent = entry.get("parent")
        cards[entry["id"]] = ModelCard(
            max_model_len=length
            if isinstance(length, int) and not isinstance(length, bool)
            else None,
            parent=parent if isinstance(parent, str) else None,
        )
    return cards


class ModelCards:
    """Each provider's model cards, fetched on demand (concurrently, bounded in time) and kept
    for CARDS_TTL_SECONDS; a node that fails keeps its last cards and is asked again later."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        ttl: float = CARDS_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._ttl = ttl
        self._clock = clock
        self._fetched: dict[str, _Fetched] = {}
        self._lock = asyncio.Lock()

    async def of(self, providers: Iterable[Provider]) -> Mapping[str, Mapping[str, ModelCard]]:
        """The cards of each provider, by provider name, then upstream model id."""
        wanted = {provider.name: provider for provider in providers}
        # One fetch at a time: listings that arrive together wait for it, not ask again.
        async with self._lock:
            stale = [provider for provider in wanted.values() if self._stale(provider.name)]
            if stale:
                await asyncio.gather(*(self._fetch(provider) for provider in stale))
        return {
            name: fetched.cards
            for name in wanted
            if (fetched := self._fetched.get(name)) is not None
        }

    def _stale(self, name: str) -> bool:
        fetched = self._fetched.get(name)
        if fetched is None:
            return True
        wait = self._ttl if fetched.ok else FAILED_RETRY_SECONDS
        return self._clock() - fetched.at > wait

    async def _fetch(self, provider: Provider) -> None:
        headers = {"Authorization": f"Bearer {provider.credential}"} if provider.credential else {}
        previous = self._fetched.get(provider.name)
        try:
            async with (
                asyncio.timeout(FETCH_TIMEOUT_SECONDS),
                self._session.get(provider.base_url + "/v1/models", headers=headers) as response,
            ):
                if response.status != 200:
                    raise ValueError(f"status {response.status}")
                cards = parse_cards(await response.content.read(MAX_LIST_BYTES))
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            logger.info("model_cards_failed", provider=provider.name, error=type(error).__name__)
            kept = previous.cards if previous is not None else {}
            self._fetched[provider.name] = _Fetched(kept, self._clock(), ok=False)
            return
        self._fetched[provider.name] = _Fetched(cards, self._clock(), ok=True)


def model_object(
    name: str, providers: Iterable[Provider], cards: Mapping[str, Mapping[str, ModelCard]]
) -> dict[str, Any]:
    """The public model's entry, in vLLM's shape: `root` is the public name, `max_model_len` the
    smallest its providers report (a request must fit wherever it lands; None when none does),
    `parent` the public name of the base model an adapter's node names, if the gateway maps it."""
    lengths: list[int] = []
    parents: set[str | None] = set()
    for provider in providers:
        upstream = provider.upstream_models.get(name)
        card = cards.get(provider.name, {}).get(upstream) if upstream is not None else None
        if card is None:
            continue
        if card.max_model_len is not None:
            lengths.append(card.max_model_len)
        public = {up: public for public, up in provider.upstream_models.items()}
        parents.add(public.get(card.parent) if card.parent is not None else None)
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "affinity-gateway",
        "root": name,
        "parent": parents.pop() if len(parents) == 1 else None,
        "max_model_len": min(lengths) if lengths else None,
    }
