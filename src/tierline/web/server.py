"""``tierline web``: one web replica as a process."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn

from tierline.app import App
from tierline.lifecycle import QuietServer, Shutdown, listen_socket
from tierline.logs import get_logger
from tierline.notifications import Listener
from tierline.queue import Queue
from tierline.replica import Replica
from tierline.settings import Settings, env_name
from tierline.stats import Stats
from tierline.streaming import EventHub
from tierline.web.app import create_app
from tierline.web.auth import KeyRing
from tierline.web.runtime import Runtime

log = get_logger(__name__)


async def run_web(
    app: App, settings: Settings, *, sock: socket.socket | None = None, reuse_port: bool = False
) -> int:
    shutdown = Shutdown()
    shutdown.install()
    keys = KeyRing(settings.api_keys.get_secret_value() if settings.api_keys else None)
    holder: dict[str, Any] = {}

    def stats() -> dict[str, Any]:
        rt = holder.get("rt")
        if rt is None:
            return {}
        return {"http": rt.load.snapshot(), "sse_streams": rt.hub.active}

    replica = Replica(settings, "web", stats=stats)
    hub = EventHub(lambda: replica.pool, buffer_size=settings.sse_buffer_events)
    rt = Runtime(settings=settings, app=app, replica=replica, keys=keys, hub=hub)
    holder["rt"] = rt
    api = create_app(rt)
    # Replicas sharing a port (SO_REUSEPORT, or a socket inherited from `tierline up`) get
    # connections as soon as they accept, with no readiness gate in front: such a replica
    # serves only once ready, so scaling the web tier out never sends a request to a
    # replica that would answer 503 "starting".
    shared = reuse_port or sock is not None
    started = await replica.start(shutdown.stop) if shared else None
    if sock is None:
        sock = listen_socket(
            settings.web_host,
            settings.web_port,
            setting=env_name("web_port"),
            reuse_port=reuse_port,
        )
    server = QuietServer(
        uvicorn.Config(
            api,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
            loop="none",
            http="httptools",
            timeout_keep_alive=30,
        )
    )
    server_task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
    host, port = sock.getsockname()[:2]
    log.info(
        "web tier listening",
        url=f"http://{host}:{port}",
        auth="api keys" if keys.enabled else "open",
    )

    side: list[asyncio.Task[Any]] = []
    if started if started is not None else await replica.start(shutdown.stop):
        assert replica.pool is not None
        rt.queue = Queue(app, replica.pool, max_args_bytes=settings.max_args_bytes)
        rt.stats = Stats(replica.pool)
        app.bind(rt.queue)
        listener = Listener(
            settings, ["tierline_events"], hub.notify, on_connect=hub.caught_up, name="web-listen"
        )
        side = [
            asyncio.create_task(replica.heartbeat_forever(), name="heartbeat"),
            asyncio.create_task(listener.run(), name="listener"),
            asyncio.create_task(hub.run(), name="event-hub"),
        ]
        stop_task = asyncio.create_task(shutdown.stop.wait())
        await asyncio.wait([stop_task, server_task, *side], return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
    # Shutdown: report not-ready, end streams cleanly, let requests finish, leave.
    rt.draining = True
    rt.shutdown.set()
    hub.close()
    server.should_exit = True
    try:
        await asyncio.wait_for(server_task, timeout=15)
    except TimeoutError:
        log.warning("requests still open after the grace period; closing them")
    for task in side:
        task.cancel()
    await asyncio.gather(*side, return_exceptions=True)
    await replica.close()
    log.info("web tier stopped")
    return 0
