"""Single flight: concurrent callers for one (key id, model) in this process share one call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Result = TypeVar("Result")


class SingleFlight(Generic[Result]):
    """The call in flight per (key id, model); a caller arriving meanwhile awaits its result."""

    def __init__(self) -> None:
        """Start with no call in flight."""
        self._pending: dict[tuple[str, str], asyncio.Future[Result | None]] = {}

    async def run(self, key: tuple[str, str], call: Callable[[], Awaitable[Result]]) -> Result:
        """The first caller makes the call, the others await its result (never None).

        If the first caller is cancelled (its client left), the others do not inherit that:
        they are told to try again, and one of them makes the call.
        """
        pending = self._pending
        while (shared := pending.get(key)) is not None:
            result = await asyncio.shield(shared)
            if result is not None:
                return result
        future: asyncio.Future[Result | None] = asyncio.get_running_loop().create_future()
        pending[key] = future
        try:
            result = await call()
        except BaseException:
            future.set_result(None)
            raise
        finally:
            if pending.get(key) is future:
                del pending[key]
        future.set_result(result)
        return result
