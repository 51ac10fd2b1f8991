"""An application's own ASGI app for the web-hosting tests (``TIERLINE_WEB_APP``): routes
that use the web tier's pool, a transactional enqueue, a lifespan, a plain Starlette
route, and an app whose route collides with Tierline's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from psycopg import AsyncConnection
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.jobs_app import record
from tierline.web import connection

ORDERS_TABLE = "CREATE TABLE IF NOT EXISTS public.orders (id bigserial PRIMARY KEY, token text)"


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
    yield {"started_by": "lifespan"}


api = FastAPI(lifespan=lifespan)
Conn = Annotated[AsyncConnection[Any], Depends(connection)]


@api.get("/hello")
async def hello(request: Request) -> dict[str, Any]:
    return {"hello": "world", "state": request.state.started_by}


@api.get("/v1/items/{item_id}")
async def item(item_id: int, conn: Conn) -> dict[str, Any]:
    row = await (
        await conn.execute("SELECT %s::int AS id, pg_backend_pid() AS pid", (item_id,))
    ).fetchone()
    assert row is not None
    return {"id": row["id"], "backend": row["pid"]}


@api.get("/hold")
async def hold(conn: Conn, seconds: float = 1.0) -> dict[str, Any]:
    """Holds a pooled connection for ``seconds``."""
    await conn.execute("SELECT 1")
    await asyncio.sleep(seconds)
    return {"held_s": seconds}


@api.post("/orders")
async def order(conn: Conn, token: str, fail: bool = False) -> dict[str, Any]:
    """Writes an order and enqueues its job in one transaction; ``fail`` rolls back."""
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO public.orders (token) VALUES (%s)", (token,))
            job = await record.using(connection=conn).enqueue(token=token)
            if fail:
                raise RuntimeError("rolled back on purpose")
    except RuntimeError:
        return {"committed": False}
    return {"committed": True, "job": job.id}


async def plain(request: Any) -> JSONResponse:
    """Plain Starlette code: the connection as an async context manager."""
    async with connection(request) as conn:
        row = await (await conn.execute("SELECT 41 + 1 AS answer")).fetchone()
    return JSONResponse({"answer": row["answer"] if row else None})


api.mount("/plain", Starlette(routes=[Route("/answer", plain)]))

# An application that would shadow Tierline's /metrics: refused at start-up.
clashing = FastAPI()


@clashing.get("/metrics")
async def own_metrics() -> dict[str, str]:
    return {"mine": "yes"}


async def raw(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI callable with no lifespan support (as Django's handler is)."""
    assert scope["type"] == "http"
    body = f"raw {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
