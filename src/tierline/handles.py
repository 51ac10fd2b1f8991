"""Typed job handles: what ``@app.job(...)`` returns.

A handle is still the plain function (``send(user_id=7)`` calls it, for unit tests) and
enqueues it by name with the handler's parameters as its own, so a type checker sees them:
``await send.enqueue(user_id=7)``, ``send.enqueue_sync(...)``, ``send.enqueue_many([...])``
and ``send.using(queue=..., delay_s=..., connection=conn)``, a configured copy (the names
of Django's Tasks framework). ``connection=`` (a psycopg ``AsyncConnection`` or
``Connection``) makes the enqueue part of the caller's transaction.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Self, TypeVar

from tierline.errors import InvalidJob
from tierline.jobs import Job, JobRequest

if TYPE_CHECKING:
    from tierline.app import App
    from tierline.context import JobContext
    from tierline.enqueue import AnyConnection
    from tierline.unique import UniqueOption

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Options:
    """How a handle enqueues; unset options take the handler's defaults."""

    queue: str | None = None
    priority: int | None = None
    delay_s: float | None = None
    run_at: datetime | None = None
    idempotency_key: str | None = None
    max_attempts: int | None = None
    timeout_s: float | None = None
    unique: UniqueOption = None
    connection: AnyConnection | None = None

    def request(self) -> dict[str, Any]:
        """The ``JobRequest`` fields among them."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "connection" and getattr(self, f.name) is not None
        }


class _Handle(Generic[P, R]):
    """What both kinds of handle share: the kind, the options, the enqueue methods."""

    def __init__(self, app: App, kind: str, func: Callable[..., R], options: Options) -> None:
        self.app = app
        self.kind = kind
        self.func = func
        self.options = options
        params = list(inspect.signature(func).parameters.values())
        if self._takes_context:
            params = params[1:]
        self._signature = inspect.Signature(params)
        self.__name__ = getattr(func, "__name__", kind)
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    _takes_context = False

    def __repr__(self) -> str:
        return f"<job {self.kind!r}>"

    def using(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay_s: float | None = None,
        run_at: datetime | None = None,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        unique: UniqueOption = None,
        connection: AnyConnection | None = None,
    ) -> Self:
        """A copy that enqueues with these options (the others as they were)."""
        given: dict[str, Any] = {
            "queue": queue,
            "priority": priority,
            "delay_s": delay_s,
            "run_at": run_at,
            "idempotency_key": idempotency_key,
            "max_attempts": max_attempts,
            "timeout_s": timeout_s,
            "unique": unique,
            "connection": connection,
        }
        changes = {k: v for k, v in given.items() if v is not None}
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.options = dataclasses.replace(self.options, **changes)
        return copy

    def args(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The call's arguments by name, as they are enqueued."""
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidJob(f"invalid args for {self.kind!r}: {exc}") from None
        named = dict(bound.arguments)
        for p in self._signature.parameters.values():  # **kwargs handlers: spread them
            if p.kind is p.VAR_KEYWORD and p.name in named:
                named.update(named.pop(p.name))
        return named

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Enqueue a run with these arguments; the job (the existing one for a repeated
        idempotency key)."""
        return await self.app.enqueue(
            self.kind,
            self.args(*args, **kwargs),
            connection=self.options.connection,
            **self.options.request(),
        )

    def enqueue_sync(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """``enqueue`` for synchronous code."""
        return self.app.enqueue_sync(
            self.kind,
            self.args(*args, **kwargs),
            connection=self.options.connection,
            **self.options.request(),
        )

    async def enqueue_many(self, calls: Iterable[Mapping[str, Any]]) -> list[Job]:
        """Enqueue one run per mapping of arguments, in one statement and transaction."""
        requests = [
            JobRequest(kind=self.kind, args=self.args(**call), **self.options.request())
            for call in calls
        ]
        return await self.app.enqueue_jobs(requests, connection=self.options.connection)


class JobHandle(_Handle[P, R]):
    """The handle of a handler without a context: ``handle(...)`` calls the function."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)


class ContextJobHandle(_Handle[P, R]):
    """The handle of a handler whose first parameter is the ``JobContext``:
    ``handle(ctx, ...)`` calls the function; the enqueue methods take the rest."""

    _takes_context = True

    def __call__(self, ctx: JobContext, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(ctx, *args, **kwargs)
