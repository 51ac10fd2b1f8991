"""Connections for the application's routes, lent from the web tier's budgeted pool.

``connection`` works two ways::

    # FastAPI: a dependency; the connection goes back to the pool after the response
    @app.get("/items/{item_id}")
    async def item(item_id: int, conn: Annotated[AsyncConnection, Depends(connection)]): ...

    # Starlette or any code that has the request: an async context manager
    async with connection(request) as conn: ...

The connection is the pool's: autocommit (open a transaction with ``conn.transaction()``),
rows as dicts, counted in ``tierline_db_pool_*{tier="web"}`` while held or waited for.
A request that waits longer than ``TIERLINE_DB_POOL_TIMEOUT_S`` gets a 503 JSON error.
``read_connection`` is the same for read-only work: with ``TIERLINE_DATABASE_READ_URL``
it lends from the read pool (``tierline_db_pool_*{target="replica"}``) while the replica
keeps within ``TIERLINE_READ_MAX_LAG_S``, else, and when no replica connection frees
within a second, from the primary's pool; without a read replica, always the primary's.
What it reads may be up to that lag old: read what the request itself just wrote with
``connection``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request

from tierline.database import Conn
from tierline.errors import TierlineError


class PoolBusy(HTTPException):
    """No pooled connection within the pool timeout (503; ``Retry-After: 1``)."""

    def __init__(self, detail: str, code: str = "pool_timeout") -> None:
        super().__init__(503, detail, headers={"Retry-After": "1"})
        self.code = code


class Lease:
    """One borrowed connection, for one request. An async context manager, and the
    async-generator protocol as well, so that FastAPI can use it as a dependency with
    cleanup (it drives ``__anext__`` / ``athrow`` like a generator's)."""

    def __init__(self, request: HTTPConnection, *, read: bool = False) -> None:
        self.request = request
        self.read = read
        self._borrow: Any = None
        self._state = 0  # 0 not yet, 1 lent, 2 given back

    async def __aenter__(self) -> Conn:
        runtime = self.request.scope.get("tierline.runtime")
        if runtime is None:
            raise TierlineError(
                "tierline.web.connection lends the web tier's pool: run the application "
                "in the web tier (TIERLINE_WEB_APP), or override the dependency in tests"
            )
        pool = runtime.replica.pool
        if pool is None or not runtime.replica.ready:
            raise PoolBusy(f"replica not ready: {runtime.replica.reason}", "not_ready")
        timeout = runtime.settings.db_pool_timeout_s
        reads = runtime.reads if self.read else None
        self._borrow = (
            reads.connection(timeout) if reads is not None else pool.connection(timeout=timeout)
        )
        try:
            conn: Conn = await self._borrow.__aenter__()
        except PoolTimeout as exc:
            raise PoolBusy(f"no database connection free in time ({exc})") from None
        self._state = 1
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._state != 1:
            return None
        self._state = 2
        return await self._borrow.__aexit__(exc_type, exc, tb)  # type: ignore[no-any-return]

    # -- the async-generator protocol, for FastAPI's dependencies with cleanup ---------------
    def __aiter__(self) -> Lease:
        return self

    async def __anext__(self) -> Conn:
        if self._state == 0:
            return await self.__aenter__()
        await self.__aexit__(None, None, None)
        raise StopAsyncIteration

    async def athrow(self, typ: Any, val: Any = None, tb: Any = None) -> Conn:
        # athrow(type, value, tb) before Python 3.12, athrow(value) since
        exc = val if isinstance(val, BaseException) else typ
        if not isinstance(exc, BaseException):
            exc = exc()
        await self.__aexit__(type(exc), exc, exc.__traceback__)
        raise exc

    async def aclose(self) -> None:
        await self.__aexit__(None, None, None)


async def _as_dependency(self: Any, request: Request) -> Any:  # pragma: no cover - a shape
    """What FastAPI reads: an async generator dependency of the request."""
    yield None


class Lender:
    """``connection(request)``: a ``Lease`` of the web tier's pool (``read``: of the read
    pool when there is one)."""

    def __init__(self, *, read: bool = False) -> None:
        self.read = read

    def __call__(self, request: Request) -> Lease:
        return Lease(request, read=self.read)

    # FastAPI tells a dependency with cleanup from a plain one by looking (through
    # ``__wrapped__``) for an async generator function; the Lease behaves like one.
    __call__.__wrapped__ = _as_dependency  # type: ignore[attr-defined]


connection = Lender()
read_connection = Lender(read=True)  # the read replica's pool, when configured
