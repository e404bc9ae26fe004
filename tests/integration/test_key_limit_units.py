"""One more unit of a spent key-limit share, asked on the request path: the same on the
in-memory twin and on Postgres, from the store call up to a worker's admissions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from affinity_store.locks import SHARES_NAMESPACE, binding_lock_key
from affinity_store.memory_store import MemoryAffinityStore
from affinity_store.store import AffinityStore, StoreError, StoreUnavailable, UnitGrant
from gateway.catalog import Key
from gateway.dispatch.cluster_shares import WORKER_TTL_SECONDS, ClusterShares
from gateway.dispatch.key_shares import CONCURRENCY, ShareBook
from gateway.dispatch.permits import KeyLimits
from gateway.shared.errors import GatewayError
from tests.support.keys import plain_key
from tests.support.polling import wait_until

pytestmark = pytest.mark.timeout(60)

TTL = 30.0
TIMEOUT = 5.0


async def test_a_unit_is_granted_only_while_the_key_has_one_free(store: AffinityStore) -> None:
    """Limit 2: each of two workers gets a unit; a third unit is refused and the grant kept;
    asking again for what is already held changes nothing; a unit given back is free again."""
    for worker in ("a", "b"):
        await store.heartbeat(worker, ttl_seconds=TTL, timeout=TIMEOUT)

    async def unit(worker: str, needed: int) -> UnitGrant:
        return await store.claim_unit(
            "k", CONCURRENCY, worker, limit=2, needed=needed, timeout=TIMEOUT
        )

    assert await unit("a", 1) == UnitGrant(1, True)
    assert await unit("b", 1) == UnitGrant(1, True)
    assert await unit("a", 2) == UnitGrant(1, False)
    assert await unit("a", 1) == UnitGrant(1, True)
    await store.release_units("k", CONCURRENCY, "b", keep=0, timeout=TIMEOUT)
    assert await unit("a", 2) == UnitGrant(2, True)
    assert await unit("b", 1) == UnitGrant(0, False)
    shares = {share.worker_id: share for share in await store.list_shares(timeout=TIMEOUT)}
    assert (shares["a"].granted, shares["b"].granted) == (2, 0)
    assert shares["b"].wanted == 1  # the refused want is recorded: holders yield next claim


async def test_concurrent_unit_claims_never_grant_past_the_limit(store: AffinityStore) -> None:
    """Twenty workers each asking for a unit of a limit of 3 at once: exactly 3 are granted."""
    workers = [f"w{index:02}" for index in range(20)]
    for worker in workers:
        await store.heartbeat(worker, ttl_seconds=TTL, timeout=TIMEOUT)
    answers = await asyncio.gather(
        *(
            store.claim_unit("k", CONCURRENCY, worker, limit=3, needed=1, timeout=TIMEOUT)
            for worker in workers
        )
    )
    assert sum(answer.admitted for answer in answers) == 3
    assert sum(share.granted for share in await store.list_shares(timeout=TIMEOUT)) == 3


async def test_a_lapsed_worker_gets_no_unit_and_its_grant_is_free(store: AffinityStore) -> None:
    """A worker whose registration expired cannot claim a unit (it must heartbeat first), and
    what it held counts for nothing: another worker gets the whole limit."""
    await store.heartbeat("gone", ttl_seconds=0.2, timeout=TIMEOUT)
    await store.heartbeat("alive", ttl_seconds=TTL, timeout=TIMEOUT)
    taken = await store.claim_unit("k", CONCURRENCY, "gone", limit=1, needed=1, timeout=TIMEOUT)
    assert taken == UnitGrant(1, True)

    async def expired() -> bool:
        return (await store.heartbeat("alive", ttl_seconds=TTL, timeout=TIMEOUT)).workers == (
            "alive",
        )

    await wait_until(expired, timeout=5, message="registration expired")
    with pytest.raises(StoreError, match="lapsed"):
        await store.claim_unit("k", CONCURRENCY, "gone", limit=1, needed=1, timeout=TIMEOUT)
    freed = await store.claim_unit("k", CONCURRENCY, "alive", limit=1, needed=1, timeout=TIMEOUT)
    assert freed == UnitGrant(1, True)


async def test_a_unit_claim_waits_for_the_keys_lock_no_longer_than_its_deadline(
    postgres_store: AffinityStore, database_url: str
) -> None:
    """While another session holds the key's share lock the claim gives up at its deadline
    (StoreError), and once the lock is free the same claim is granted."""
    await postgres_store.heartbeat("a", ttl_seconds=TTL, timeout=TIMEOUT)
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT pg_advisory_xact_lock($1::int4, $2::int4)",
                SHARES_NAMESPACE,
                binding_lock_key("k", CONCURRENCY),
            )
            started = asyncio.get_running_loop().time()
            with pytest.raises(StoreError):
                await postgres_store.claim_unit(
                    "k", CONCURRENCY, "a", limit=1, needed=1, timeout=0.3
                )
            assert asyncio.get_running_loop().time() - started < 2.0
    finally:
        await holder.close()
    granted = await postgres_store.claim_unit(
        "k", CONCURRENCY, "a", limit=1, needed=1, timeout=TIMEOUT
    )
    assert granted == UnitGrant(1, True)


async def _workers(
    store: AffinityStore, key: Key, count: int
) -> tuple[list[KeyLimits], list[ClusterShares]]:
    """`count` registered, idle workers whose spent shares ask the store for units."""
    limits = [KeyLimits(shares=ShareBook(workers=count)) for _ in range(count)]
    syncs = []
    for index, limit in enumerate(limits):
        sync = ClusterShares(
            store,
            limit.shares,
            keys=lambda: [key],
            in_flight=limit.in_flight_by_id,
            worker_id=f"w{index}",
            unit_timeout=TIMEOUT,
        )
        limit.units = sync
        syncs.append(sync)
    for _ in range(2):  # the first syncs see fewer workers; the second round settles
        for sync in syncs:
            await sync.sync(heartbeat=True)
    return limits, syncs


async def test_twelve_requests_at_once_on_idle_workers_admit_exactly_the_limit(
    store: AffinityStore,
) -> None:
    """`max_concurrency: 2` over four idle workers (shares of nothing): twelve requests at once,
    three per worker, admit exactly 2; the others are 429 because the limit is in use."""
    key = plain_key(max_concurrency=2)
    limits, syncs = await _workers(store, key, 4)
    assert [limit.shares.concurrency(key) for limit in limits] == [0, 0, 0, 0]
    outcomes = await asyncio.gather(
        *(limit.admit(key) for limit in limits for _ in range(3)), return_exceptions=True
    )
    refusals = [outcome for outcome in outcomes if isinstance(outcome, GatewayError)]
    assert len(outcomes) - len(refusals) == 2, outcomes
    assert {(refusal.status, refusal.code) for refusal in refusals} == {
        (429, "key_concurrency_limit")
    }
    assert all("in use across" in str(refusal) for refusal in refusals)
    for sync in syncs:
        await sync.stop()


async def test_one_request_at_a_time_over_every_worker_is_never_refused(
    store: AffinityStore,
) -> None:
    """`max_concurrency: 1` over three workers: one request at a time, each on the next worker,
    is always admitted; its unit goes back when it ends, so no worker sits on it."""
    key = plain_key(max_concurrency=1)
    limits, syncs = await _workers(store, key, 3)

    async def nothing_held() -> bool:
        return sum(share.granted for share in await store.list_shares(timeout=TIMEOUT)) == 0

    for turn in range(12):
        limit = limits[turn % 3]
        await limit.admit(key)
        if turn % 4 == 0:
            for sync in syncs:  # beats in between change nothing
                await sync.sync(heartbeat=True)
        limit.release(key)
        await wait_until(nothing_held, timeout=5, message="unit given back")
    for sync in syncs:
        await sync.stop()


async def test_a_worker_whose_registration_lapsed_drops_its_grants() -> None:
    """A worker cut off from the store for longer than its registration lives stops using its
    grants (the store may give them away) and claims afresh once back: after the outage the
    key never has more than its limit admitted, where the old grants would have added theirs."""
    now = [1000.0]
    wall = [datetime(2026, 1, 1, tzinfo=UTC)]
    store = MemoryAffinityStore(clock=lambda: wall[0])
    key = plain_key(max_concurrency=2)
    limits = []
    syncs = []
    for worker in ("a", "b"):
        limit = KeyLimits(shares=ShareBook(workers=2, clock=lambda: now[0]))
        sync = ClusterShares(
            store,
            limit.shares,
            keys=lambda: [key],
            in_flight=limit.in_flight_by_id,
            worker_id=worker,
        )
        limit.units = sync
        await sync.sync(heartbeat=True)
        limits.append(limit)
        syncs.append(sync)
    first, second = limits
    taken = await store.claim_share(
        key.id, CONCURRENCY, "a", limit=2, wanted=2, keep=0, timeout=TIMEOUT
    )
    first.shares.granted(key.id, CONCURRENCY, taken.granted, taken.fair, 2)
    assert first.shares.concurrency(key) == 2  # held: admitted with no store call
    store.fail_with(StoreUnavailable("down"))
    now[0] += WORKER_TTL_SECONDS + 1
    wall[0] += timedelta(seconds=WORKER_TTL_SECONDS + 1)
    await syncs[0].sync()
    assert first.shares.concurrency(key) == 0
    with pytest.raises(GatewayError) as unanswered:
        await first.admit(key)
    assert unanswered.value.status == 503
    store.fail_with(None)
    await syncs[1].sync(heartbeat=True)  # the other worker is back first and takes the limit
    for _ in range(2):
        await second.admit(key)
    await syncs[0].sync(heartbeat=True)
    with pytest.raises(GatewayError) as refused:
        await first.admit(key)
    assert refused.value.status == 429
    assert first.in_flight(key) + second.in_flight(key) == 2


class CountingUnits(MemoryAffinityStore):
    """The in-memory twin, counting unit claims, which wait at a door until it opens."""

    def __init__(self) -> None:
        super().__init__()
        self.unit_claims = 0
        self.door = asyncio.Event()
        self.door.set()

    async def claim_unit(
        self,
        api_key_id: str,
        resource: str,
        worker_id: str,
        *,
        limit: int,
        needed: int,
        timeout: float,  # noqa: ASYNC109 - the store contract names it so
    ) -> UnitGrant:
        """Count, wait for the door, then claim."""
        self.unit_claims += 1
        await self.door.wait()
        return await super().claim_unit(
            api_key_id, resource, worker_id, limit=limit, needed=needed, timeout=timeout
        )


async def test_a_flood_at_a_key_in_use_elsewhere_costs_two_store_calls() -> None:
    """Fifty requests arriving on a worker while its first unit claim is on its way, the key's
    only unit held by another worker: all are 429, from that claim and one more, sent after the
    others arrived (its answer covers them); a request arriving after that asks again."""
    store = CountingUnits()
    key = plain_key(max_concurrency=1)
    limits, syncs = await _workers(store, key, 2)
    await limits[0].admit(key)
    store.unit_claims = 0
    store.door.clear()
    flood = [asyncio.create_task(limits[1].admit(key)) for _ in range(50)]
    await wait_until(lambda: store.unit_claims == 1, message="the first claim sent")
    store.door.set()  # every request of the flood arrived while it was on its way
    outcomes = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(outcome, GatewayError) for outcome in outcomes)
    assert store.unit_claims == 2
    with pytest.raises(GatewayError):
        await limits[1].admit(key)
    assert store.unit_claims == 3
    limits[0].release(key)

    async def given_back() -> bool:
        return sum(share.granted for share in await store.list_shares(timeout=TIMEOUT)) == 0

    await wait_until(given_back, timeout=5, message="unit given back")
    await limits[1].admit(key)
    for sync in syncs:
        await sync.stop()
