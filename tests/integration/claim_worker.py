"""A separate OS process that claims one `(key, model)` from several connections at once.

Usage: python -m tests.integration.claim_worker URL KEY MODEL FIRST_INDEX COUNT PROVIDERS
Claim i proposes provider `provider-{FIRST_INDEX + i}` on its own pool; every provider in
`provider-0 … provider-{PROVIDERS - 1}` is acceptable. Prints the bound providers as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys

from affinity_store.postgres import create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.store import Candidate

CLAIM_TIMEOUT = 30.0


async def claim_once(url: str, key: str, model: str, index: int, providers: int) -> str:
    """Claim through a pool of its own, proposing provider number `index`."""
    pool = await create_pool(url, min_size=1, max_size=1, statement_cache_size=0)
    try:
        proposal = Candidate(f"provider-{index}", f"provider-{index}")
        binding = await PostgresAffinityStore(pool).claim(
            key,
            model,
            acceptable={f"provider-{number}" for number in range(providers)},
            preferred=[proposal],
            ttl_seconds=300,
            timeout=CLAIM_TIMEOUT,
        )
        return binding.provider
    finally:
        await pool.close()


async def run(arguments: list[str]) -> list[str]:
    """Run the claims concurrently and return the providers they bound."""
    url, key, model, first, count, providers = arguments
    return list(
        await asyncio.gather(
            *(
                claim_once(url, key, model, int(first) + offset, int(providers))
                for offset in range(int(count))
            )
        )
    )


def main() -> None:
    """Parse the command line, claim, and print the outcome as JSON."""
    sys.stdout.write(json.dumps(asyncio.run(run(sys.argv[1:]))) + "\n")


if __name__ == "__main__":
    main()
