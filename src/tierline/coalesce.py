"""Coalesced lookups: concurrent callers asking for keys share one query per round."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """Answers concurrent lookups with one query per round: while a round's query runs,
    new keys wait for the next one, so a burst of N new streams (every client of a
    restarted replica reconnecting at once) costs a few queries and one pooled
    connection, not N of each.

    ``run`` maps a batch of distinct keys (at most ``max_batch``) to what it found; a key
    it leaves out answers None; its exception is raised to every caller of that round.
    """

    def __init__(
        self, run: Callable[[list[K]], Awaitable[dict[K, V]]], max_batch: int, *, name: str
    ) -> None:
        self._run = run
        self._max = max_batch
        self._name = name  # of the task that runs the rounds
        self._waiting: list[tuple[K, asyncio.Future[V | None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V | None:
        fut: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((key, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._rounds(), name=self._name)
        return await fut

    async def _rounds(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self._max], self._waiting[self._max :]
            batch = [(k, f) for k, f in batch if not f.done()]  # callers that gave up
            if not batch:
                continue
            try:
                found = await self._run(list(dict.fromkeys(k for k, _ in batch)))
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for key, fut in batch:
                if not fut.done():
                    fut.set_result(found.get(key))
