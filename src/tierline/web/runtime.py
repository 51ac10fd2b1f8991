"""What a web replica's routes share: settings, the app, the replica and its pool."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Depends, Request

from tierline.app import App
from tierline.queue import Queue
from tierline.read_routing import ReadRouter
from tierline.recommender import Recommender
from tierline.replica import Replica
from tierline.settings import Settings
from tierline.stats import Stats
from tierline.streaming import EventHub
from tierline.web.auth import KeyRing
from tierline.web.errors import ApiError
from tierline.web.load import LoadMeter


@dataclass
class Runtime:
    settings: Settings
    app: App
    replica: Replica
    keys: KeyRing
    hub: EventHub
    refresh_metrics: Callable[[], Awaitable[None]]  # the database's gauges, before a scrape
    queue: Queue | None = None
    stats: Stats | None = None
    recommender: Recommender | None = None
    reads: ReadRouter | None = None  # the read replica's routing, when configured
    draining: bool = False
    load: LoadMeter = field(default_factory=LoadMeter)
    shutdown: anyio.Event = field(default_factory=anyio.Event)

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        return self.replica.ready, self.replica.reason

    def require_queue(self) -> Queue:
        if self.queue is None or not self.replica.ready:
            raise ApiError(
                503,
                "not_ready",
                f"replica not ready: {self.replica.reason}",
                headers={"Retry-After": "2"},
            )
        return self.queue

    def require_stats(self) -> Stats:
        self.require_queue()
        assert self.stats is not None
        return self.stats

    def require_recommender(self) -> Recommender:
        self.require_queue()
        assert self.recommender is not None
        return self.recommender


async def runtime(request: Request) -> Runtime:
    """The replica's runtime (async: FastAPI runs plain-def dependencies in a thread)."""
    rt: Runtime = request.app.state.runtime
    return rt


def scoped(scope: str) -> Any:
    """A dependency: the runtime, once the request's key has ``scope`` (when keys are on)."""

    async def check(request: Request) -> Runtime:
        rt: Runtime = request.app.state.runtime
        rt.keys.check(request, scope)
        return rt

    return Depends(check)
