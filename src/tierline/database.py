"""Connections: one-off connections with backoff, and every connection pool Tierline opens.

Nothing here keeps session state on pooled connections (no SET, no session advisory
locks), so pools may point at PgBouncer in transaction mode. Server-side prepared
statements are only used when the pool talks to PostgreSQL directly (or when enabled).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from weakref import WeakKeyDictionary

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from tierline.backoff import backoff_delays
from tierline.errors import DatabaseUnavailable, SettingsError
from tierline.logs import get_logger
from tierline.settings import Settings, env_name

log = get_logger(__name__)


class Conn(psycopg.AsyncConnection[DictRow]):
    """Tierline's connections: psycopg's, autocommit, answering dict rows, with one cursor
    kept for single statements (``statement_cursor``)."""

    _statement_cursor: psycopg.AsyncCursor[DictRow] | None = None

    def statement_cursor(self) -> psycopg.AsyncCursor[DictRow]:
        """The connection's cursor for one statement at a time, made once. A cursor made
        per statement (``conn.execute``) learns anew how to dump each parameter and load
        each column: a quarter of psycopg's client time for an enqueue (217k -> 163k
        instructions per statement). Read its rows before the next statement; not for
        pipelines, where every statement needs a cursor of its own."""
        cur = self._statement_cursor
        if cur is None or cur.closed:
            cur = self._statement_cursor = self.cursor()
        return cur


def statement_cursor(conn: psycopg.AsyncConnection[DictRow]) -> psycopg.AsyncCursor[DictRow]:
    """``Conn.statement_cursor``, or a new cursor on a connection from a pool that is not
    Tierline's (a ``Queue`` over the caller's own pool)."""
    if isinstance(conn, Conn):
        return conn.statement_cursor()
    return conn.cursor()


POOL_RECONNECT_S = 30.0  # how long a pool keeps retrying one failed connection (seconds)


def uses_pooler(settings: Settings) -> bool:
    """True when the pool URL differs from the direct URL (e.g. PgBouncer)."""
    return settings.dsn() != settings.direct_dsn()


def prepare_threshold(settings: Settings) -> int | None:
    return None if uses_pooler(settings) else 5


async def connect(
    dsn: str, settings: Settings, *, attempts: int | None = None, application_name: str = ""
) -> Conn:
    """Open one autocommit connection, retrying with jittered backoff.

    ``attempts`` None retries forever (start-up: the database may come later).
    """
    delays = backoff_delays()
    tried = 0
    while True:
        tried += 1
        try:
            return await Conn.connect(
                dsn,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=max(1, round(settings.db_connect_timeout_s)),
                application_name=application_name or "tierline",
                prepare_threshold=None,
            )
        except psycopg.OperationalError as exc:
            if attempts is not None and tried >= attempts:
                raise DatabaseUnavailable(
                    f"cannot connect to the database: {_first_line(exc)}"
                ) from None
            delay = next(delays)
            log.warning(
                "database connection failed; retrying",
                error=_first_line(exc),
                retry_in_s=round(delay, 2),
                attempt=tried,
            )
            await asyncio.sleep(delay)


def make_pool(
    settings: Settings,
    *,
    min_size: int,
    max_size: int,
    name: str,
    direct: bool = False,
    read: bool = False,
) -> AsyncConnectionPool[Conn]:
    """A replica's pool (or a CLI command's, ``direct`` for the direct URL; ``read``: the
    web tier's pool on ``TIERLINE_DATABASE_READ_URL``); not open yet: ``await
    pool.open()`` starts it.

    One background worker opens connections one at a time, so a replica's minimum is
    reached gradually rather than as a burst.
    """
    if read:
        dsn = settings.read_dsn()
        if dsn is None:
            raise SettingsError(f"{env_name('database_read_url')} is not set")
    else:
        dsn = settings.direct_dsn() if direct else settings.dsn()
    return _pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        name=name,
        connection={
            # The read URL may be a pooler in front of several replicas: no server-side
            # prepared statements there (they would land on another server's session).
            "prepare_threshold": None if read else prepare_threshold(settings),
            "application_name": f"tierline-{name}",
            "connect_timeout": max(1, round(settings.db_connect_timeout_s)),
        },
        timeout=settings.db_pool_timeout_s,
        num_workers=1,
        # psycopg_pool retries a failed connection after ~1, 2, 4... s (x2, +-10% jitter)
        # and gives up after this long; the next request that needs a connection starts
        # over. 0 would mean "give up after one immediate retry", leaving the pool below
        # its minimum after any refusal (e.g. "too many clients" during a rollout).
        reconnect_timeout=POOL_RECONNECT_S,
        check=check_if_idle,
        reset=_mark_returned,
    )


def standalone_pool(
    dsn: str, *, max_size: int = 2, name: str = "enqueue"
) -> AsyncConnectionPool[Conn]:
    """A small pool for a process that runs no tier and only enqueues (a script, a sync
    web framework): it has a DSN but no tier settings; psycopg's and psycopg_pool's
    defaults otherwise. Not open yet: ``await pool.open()`` starts it."""
    return _pool(dsn, min_size=1, max_size=max_size, name=name)


def _pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    name: str,
    connection: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncConnectionPool[Conn]:
    """The one place pools are built: autocommit connections returning dict rows."""
    return AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name,
        connection_class=Conn,
        kwargs={"autocommit": True, "row_factory": dict_row, **(connection or {})},
        **options,
    )


class borrow:  # lowercase: used as `async with borrow(pool) as conn`, like pool.connection()
    """``pool.connection()`` for Tierline's own statements, at half the cost: psycopg_pool's
    context manager also enters the connection's own context, whose exit commits or rolls
    back (the connection's lock and a round of the wait machinery: about as much CPU as
    the checkout itself, on every statement) a transaction that an autocommit connection
    never leaves open. ``putconn`` still rolls back one left open, and replaces a broken
    connection. Code that lends a connection to the application (``web.connection``,
    ``ctx.connection()``) keeps ``pool.connection()`` and its semantics."""

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: AsyncConnectionPool[Conn]) -> None:
        self._pool = pool
        self._conn: Conn | None = None

    async def __aenter__(self) -> Conn:
        self._conn = await self._pool.getconn()
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.putconn(conn)


@asynccontextmanager
async def one_round_trip(conn: Conn) -> AsyncIterator[None]:
    """Statements executed inside run as one transaction, sent and answered in one round
    trip: a pipeline on an autocommit connection, closed by a single Sync, which the
    server runs as one implicit transaction (committed at the Sync, rolled back whole if
    any statement fails, which raises here). A ``set_config(..., true)`` holds until the
    Sync, like ``SET LOCAL``. Read the cursors' rows after the block: a fetch inside it
    would cost a round trip of its own. ``conn.transaction()`` would cost four (BEGIN, a
    sync before COMMIT, COMMIT and the pipeline's own sync)."""
    if not conn.autocommit:
        raise RuntimeError("one_round_trip needs an autocommit connection (a pooled one)")
    async with conn.pipeline():
        yield


# When each pooled connection was last handed back (it was healthy then).
_RETURNED: WeakKeyDictionary[Any, float] = WeakKeyDictionary()
CHECK_IDLE_AFTER_S = 1.0


async def check_if_idle(conn: Conn) -> None:
    """Pool checkout check: a round trip only for connections idle longer than
    ``CHECK_IDLE_AFTER_S`` (those are the ones a restart or idle timeout may have
    killed); a busy pool pays nothing. A recently used connection that died anyway fails
    its statement, which the callers retry or report as 503."""
    last = _RETURNED.get(conn)
    if last is not None and time.monotonic() - last < CHECK_IDLE_AFTER_S:
        return
    await AsyncConnectionPool.check_connection(conn)


async def _mark_returned(conn: Conn) -> None:
    _RETURNED[conn] = time.monotonic()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def describe_error(exc: BaseException) -> str:
    return _first_line(exc)
