"""The one place asyncpg and socket errors become the store's own exceptions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg

from affinity_store.store import StoreError, StoreTimeout, StoreUnavailable

_TIMEOUT_ERRORS = (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError)
_UNAVAILABLE_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    OSError,
)


@contextlib.contextmanager
def translated_driver_errors(deadline_seconds: float | None = None) -> Iterator[None]:
    """Re-raise driver, socket and deadline errors from the block as StoreError subclasses."""
    try:
        yield
    except StoreError:
        raise
    # TimeoutError is a subclass of OSError, so it must be matched first.
    except TimeoutError as error:
        deadline = "its deadline" if deadline_seconds is None else f"{deadline_seconds:.3f} s"
        raise StoreTimeout(f"store call exceeded {deadline}") from error
    except _TIMEOUT_ERRORS as error:
        raise StoreTimeout(f"store call hit a database timeout: {error}") from error
    except _UNAVAILABLE_ERRORS as error:
        raise StoreUnavailable(f"database unavailable: {error}") from error
    # InternalClientError: a pooled connection left mid-operation (seen after an outage).
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as error:
        raise StoreError(f"database error: {error}") from error
