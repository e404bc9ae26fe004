"""Worker heartbeats and key-limit shares, the same on the in-memory twin and on Postgres."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from affinity_store.memory_store import MemoryAffinityStore
from affinity_store.store import AffinityStore, ShareGrant, StoreError, StoreUnavailable
from gateway.catalog import Key
from gateway.dispatch.cluster_shares import ClusterShares
from gateway.dispatch.key_shares import CONCURRENCY, ShareBook
from gateway.dispatch.permits import KeyLimits
from gateway.shared.errors import GatewayError
from tests.support.keys import plain_key

pytestmark = pytest.mark.timeout(60)

TTL = 30.0
TIMEOUT = 5.0


async def test_a_heartbeat_s_snapshot_is_read_back_for_every_live_worker(
    store: AffinityStore,
) -> None:
    """Each live worker's last snapshot is read back by worker id; a heartbeat without one keeps
    the last; a worker that left is not listed."""
    await store.heartbeat("w1", ttl_seconds=TTL, timeout=TIMEOUT, snapshot={"in_flight": 3})
    await store.heartbeat("w2", ttl_seconds=TTL, timeout=TIMEOUT)
    await store.heartbeat("w3", ttl_seconds=TTL, timeout=TIMEOUT, snapshot={"cooling": ["a"]})
    await store.heartbeat("w1", ttl_seconds=TTL, timeout=TIMEOUT)
    await store.leave("w3", timeout=TIMEOUT)
    rows = await store.worker_snapshots(timeout=TIMEOUT)
    assert [(row.worker_id, row.snapshot) for row in rows] == [
        ("w1", {"in_flight": 3}),
        ("w2", None),
    ]
    assert all(row.started_at.tzinfo is not None for row in rows)


async def test_heartbeats_list_live_workers_and_a_leaver_is_gone_at_once(
    store: AffinityStore,
) -> None:
    """Each heartbeat lists every live worker; `leave` removes one without waiting for expiry."""
    for worker in ("w1", "w2", "w3"):
        await store.heartbeat(worker, ttl_seconds=TTL, timeout=TIMEOUT)
    beat = await store.heartbeat("w1", ttl_seconds=TTL, timeout=TIMEOUT)
    assert beat.workers == ("w1", "w2", "w3")
    await store.leave("w2", timeout=TIMEOUT)
    assert (await store.heartbeat("w1", ttl_seconds=TTL, timeout=TIMEOUT)).workers == ("w1", "w3")


async def test_an_expired_worker_and_its_share_count_for_nothing(store: AffinityStore) -> None:
    """A worker that stopped heartbeating drops out, its grant is free for the others, and when
    it comes back its lapsed share is gone: it must claim again."""
    await store.heartbeat("gone", ttl_seconds=0.2, timeout=TIMEOUT)
    taken = await store.claim_share(
        "k", CONCURRENCY, "gone", limit=2, wanted=2, keep=0, timeout=TIMEOUT
    )
    assert taken.granted == 2
    await store.heartbeat("alive", ttl_seconds=TTL, timeout=TIMEOUT)
    blocked = await store.claim_share(
        "k", CONCURRENCY, "alive", limit=2, wanted=2, keep=0, timeout=TIMEOUT
    )
    assert blocked.granted == 0
    await asyncio.sleep(0.3)
    beat = await store.heartbeat("alive", ttl_seconds=TTL, timeout=TIMEOUT)
    assert beat.workers == ("alive",)
    assert beat.shares == {("k", CONCURRENCY): 0}
    with pytest.raises(StoreError, match="lapsed"):
        await store.claim_share(
            "k", CONCURRENCY, "gone", limit=2, wanted=2, keep=0, timeout=TIMEOUT
        )
    freed = await store.claim_share(
        "k", CONCURRENCY, "alive", limit=2, wanted=2, keep=0, timeout=TIMEOUT
    )
    assert freed.granted == 2
    back = await store.heartbeat("gone", ttl_seconds=TTL, timeout=TIMEOUT)
    assert back.shares == {}
    assert [
        (share.worker_id, share.granted) for share in await store.list_shares(timeout=TIMEOUT)
    ] == [("alive", 2)]


async def test_concurrent_claims_never_grant_more_than_the_limit(store: AffinityStore) -> None:
    """Twenty workers claiming all of a limit of 3 at once: the grants sum to exactly 3."""
    workers = [f"w{index:02}" for index in range(20)]
    for worker in workers:
        await store.heartbeat(worker, ttl_seconds=TTL, timeout=TIMEOUT)
    grants = await asyncio.gather(
        *(
            store.claim_share(
                "k",
                CONCURRENCY,
                worker,
                limit=3,
                wanted=3,
                keep=0,
                timeout=TIMEOUT,
            )
            for worker in workers
        )
    )
    assert sum(grant.granted for grant in grants) == 3
    shares = await store.list_shares(timeout=TIMEOUT)
    assert sum(share.granted for share in shares) == 3
    assert len(shares) == 20


async def test_a_worker_over_its_fair_share_gives_back_what_it_does_not_keep(
    store: AffinityStore,
) -> None:
    """One worker holds all 4; a second wants 2: the first's next claim keeps only its fair 2,
    and the second then gets 2. A share in use (`keep`) is never taken back."""
    for worker in ("a", "b"):
        await store.heartbeat(worker, ttl_seconds=TTL, timeout=TIMEOUT)
    first = await store.claim_share(
        "k", CONCURRENCY, "a", limit=4, wanted=4, keep=0, timeout=TIMEOUT
    )
    assert (first.granted, first.fair) == (4, 4)
    second = await store.claim_share(
        "k", CONCURRENCY, "b", limit=4, wanted=2, keep=0, timeout=TIMEOUT
    )
    assert (second.granted, second.fair) == (0, 2)
    busy = await store.claim_share(
        "k", CONCURRENCY, "a", limit=4, wanted=4, keep=3, timeout=TIMEOUT
    )
    assert (busy.granted, busy.fair) == (3, 2)
    shrunk = await store.claim_share(
        "k", CONCURRENCY, "a", limit=4, wanted=4, keep=2, timeout=TIMEOUT
    )
    assert shrunk.granted == 2
    regrant = await store.claim_share(
        "k", CONCURRENCY, "b", limit=4, wanted=2, keep=0, timeout=TIMEOUT
    )
    assert regrant.granted == 2


async def test_four_workers_share_a_limit_of_two_and_it_follows_demand(
    store: AffinityStore,
) -> None:
    """Four synced workers, `max_concurrency: 2`: the usable shares never sum above 2, idle
    workers hold none, and a worker refused for want of share gets one once it is free."""
    key = plain_key(max_concurrency=2)
    limits = [KeyLimits(shares=ShareBook(workers=4)) for _ in range(4)]
    syncs = [
        ClusterShares(
            store,
            limit.shares,
            keys=lambda: [key],
            in_flight=limit.in_flight_by_id,
            worker_id=f"w{index}",
        )
        for index, limit in enumerate(limits)
    ]

    async def sync_all() -> None:
        for sync in syncs:
            await sync.sync(heartbeat=True)

    def usable() -> list[int]:
        return [limit.shares.concurrency(key) or 0 for limit in limits]

    await sync_all()  # the first worker synced alone: it took the whole limit
    await sync_all()  # every worker now knows of four: it gave it back
    assert usable() == [0, 0, 0, 0]  # an even split of 2 over 4 workers is 0 each
    with pytest.raises(GatewayError) as refused:
        limits[0].acquire(key)
    assert refused.value.code == "key_concurrency_limit"
    assert limits[0].shares.wake.is_set()
    await sync_all()
    assert usable()[0] == 1
    limits[0].acquire(key)
    for worker in (1, 2, 3):
        with pytest.raises(GatewayError):
            limits[worker].acquire(key)
    for _ in range(3):
        await sync_all()
        assert sum(usable()) <= 2
    assert sum(usable()) == 2
    admitted = sum(1 for limit in limits[1:] if _try(limit, key))
    assert admitted == 1  # one slot left in the cluster, wherever it went
    limits[0].release(key)
    for sync in syncs:
        await sync.stop()
    assert await store.list_shares(timeout=TIMEOUT) == []


def _try(limits: KeyLimits, key: Key) -> bool:
    """Whether the worker admits a request for the key now."""
    try:
        limits.acquire(key)
    except GatewayError:
        return False
    return True


async def test_a_worker_cut_off_from_the_store_keeps_its_last_share() -> None:
    """While the store is unreachable the worker enforces the share it last had: what is in
    use goes on, and a request past it is 503 (the store cannot say whether a unit is free)."""
    store = MemoryAffinityStore()
    key = plain_key(max_concurrency=6)
    limits = KeyLimits(shares=ShareBook(workers=1))
    sync = ClusterShares(
        store, limits.shares, keys=lambda: [key], in_flight=limits.in_flight_by_id, worker_id="w"
    )
    limits.units = sync
    await sync.sync(heartbeat=True)
    for _ in range(3):
        await limits.admit(key)
    assert limits.shares.concurrency(key) == 3
    store.fail_with(StoreUnavailable("down"))
    await sync.sync()
    assert limits.shares.concurrency(key) == 3
    with pytest.raises(GatewayError) as unanswered:
        await limits.admit(key)
    assert (unanswered.value.status, unanswered.value.code) == (503, "key_limit_unavailable")
    assert "did not answer" in str(unanswered.value)
    assert limits.in_flight(key) == 3


async def test_a_limit_a_reload_adds_holds_from_the_first_request(
    memory_store: AffinityStore,
) -> None:
    """A synced worker never guesses a new limit's share: it holds none, asks the store for a
    unit per request, and the limit holds from the first one."""
    unlimited = plain_key(max_concurrency=None)
    limits = KeyLimits(shares=ShareBook(workers=1))
    keys = [plain_key(max_concurrency=None, requests_per_minute=60)]
    sync = ClusterShares(
        memory_store,
        limits.shares,
        keys=lambda: keys,
        in_flight=limits.in_flight_by_id,
        worker_id="w",
    )
    limits.units = sync
    await sync.sync(heartbeat=True)
    await limits.admit(unlimited)
    limits.release(unlimited)
    keys[:] = [plain_key(max_concurrency=3)]
    limits.shares.track(keys)  # what a reload's new runtime does
    assert limits.shares.concurrency(keys[0]) == 0
    for _ in range(3):
        await limits.admit(keys[0])
    with pytest.raises(GatewayError) as refused:
        await limits.admit(keys[0])
    assert (refused.value.status, refused.value.code) == (429, "key_concurrency_limit")


async def test_workers_expired_for_a_minute_are_forgotten_with_their_shares(
    postgres_store: AffinityStore, database_url: str
) -> None:
    """The tables stay near their live size: a heartbeat deletes long-expired workers' rows."""
    await postgres_store.heartbeat("old", ttl_seconds=-61, timeout=TIMEOUT)
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO key_limit_shares VALUES ('k', 'max_concurrency', 'old', 1, 1)"
        )
        await postgres_store.heartbeat("new", ttl_seconds=TTL, timeout=TIMEOUT)
        workers = await connection.fetch("SELECT worker_id FROM gateway_workers")
        shares = await connection.fetchval("SELECT count(*) FROM key_limit_shares")
    finally:
        await connection.close()
    assert [row["worker_id"] for row in workers] == ["new"]
    assert shares == 0


async def test_in_flight_never_exceeds_the_limit_while_shares_move(store: AffinityStore) -> None:
    """Four workers syncing on their own schedules while traffic comes and goes on all of them:
    after every admission, the key's requests in flight across the workers are at most 3."""
    key = plain_key(max_concurrency=3)
    limits = [KeyLimits(shares=ShareBook(workers=4)) for _ in range(4)]
    syncs = [
        ClusterShares(
            store,
            limit.shares,
            keys=lambda: [key],
            in_flight=limit.in_flight_by_id,
            worker_id=f"w{index}",
        )
        for index, limit in enumerate(limits)
    ]
    for sync in syncs:
        await sync.sync(heartbeat=True)
    chooser = random.Random(3)
    deadline = asyncio.get_running_loop().time() + 3
    admitted = 0

    async def keep_syncing(sync: ClusterShares) -> None:
        while asyncio.get_running_loop().time() < deadline:
            await sync.sync(heartbeat=chooser.random() < 0.3)
            await asyncio.sleep(chooser.uniform(0, 0.02))

    async def traffic(limit: KeyLimits) -> None:
        nonlocal admitted
        while asyncio.get_running_loop().time() < deadline:
            if _try(limit, key):
                admitted += 1
                assert sum(each.in_flight(key) for each in limits) <= 3
                await asyncio.sleep(chooser.uniform(0, 0.03))
                limit.release(key)
            else:
                await asyncio.sleep(0.002)

    await asyncio.gather(
        *(keep_syncing(sync) for sync in syncs), *(traffic(limit) for limit in limits)
    )
    assert admitted > 20  # the shares moved to where requests were refused


class HeldClaims(MemoryAffinityStore):
    """The in-memory twin whose share claims wait at the door until released."""

    def __init__(self) -> None:
        super().__init__()
        self.door = asyncio.Event()
        self.door.set()

    async def claim_share(
        self,
        api_key_id: str,
        resource: str,
        worker_id: str,
        *,
        limit: int,
        wanted: int,
        keep: int,
        timeout: float,  # noqa: ASYNC109 - the store contract names it so
    ) -> ShareGrant:
        """Wait for the door, then claim."""
        await self.door.wait()
        return await super().claim_share(
            api_key_id, resource, worker_id, limit=limit, wanted=wanted, keep=keep, timeout=timeout
        )


async def test_a_share_being_given_back_admits_nothing_beyond_what_it_keeps() -> None:
    """While a claim that gives part of a share back is on its way to the store, the worker
    admits only up to what that claim keeps: the store may already hand the rest to another."""
    store = HeldClaims()
    key = plain_key(max_concurrency=2)
    limits = KeyLimits(shares=ShareBook(workers=1))
    sync = ClusterShares(
        store, limits.shares, keys=lambda: [key], in_flight=limits.in_flight_by_id, worker_id="a"
    )
    await sync.sync(heartbeat=True)  # registered; idle, it holds nothing
    taken = await store.claim_share(
        key.id, CONCURRENCY, "a", limit=2, wanted=2, keep=0, timeout=TIMEOUT
    )
    limits.shares.granted(key.id, CONCURRENCY, taken.granted, taken.fair, 2)
    assert limits.shares.concurrency(key) == 2
    await ClusterShares(
        store, ShareBook(workers=2), keys=lambda: [key], in_flight=lambda _: 0, worker_id="b"
    ).sync(heartbeat=True)
    limits.acquire(key)  # one in use: the shrinking claim keeps 1
    store.door.clear()
    pending = asyncio.create_task(sync.sync(heartbeat=True))
    await asyncio.sleep(0.01)
    assert not _try(limits, key)
    store.door.set()
    await pending
    assert limits.shares.concurrency(key) == 1
