"""The application: job handlers registered with ``@app.job`` and the enqueue API."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, TypeVar, overload

import psycopg

from tierline import enqueue as enqueueing
from tierline import tracing
from tierline.enqueue import AnyConnection
from tierline.errors import InvalidJob, UnknownKind
from tierline.executors import ExecutorName, check_executor
from tierline.handlers import Handler, signature_model
from tierline.handles import ContextJobHandle, JobHandle
from tierline.handles import Options as HandleOptions
from tierline.jobs import Job, JobRequest, json_size
from tierline.limits import QueueSpec
from tierline.producer import Producer
from tierline.queue import MAX_ARGS_BYTES, Queue
from tierline.schedules import Schedule
from tierline.settings import Settings
from tierline.unique import UniqueOption, key_parts, resolve

if TYPE_CHECKING:
    from tierline.context import JobContext

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class App:
    """A Tierline application: a registry of job handlers.

    >>> app = App()
    >>> @app.job(queue="emails", max_attempts=3)
    ... async def send(ctx, to: str) -> None: ...
    """

    def __init__(
        self,
        name: str = "tierline",
        *,
        database_url: str | None = None,
        migrations: str | os.PathLike[str] | None = None,
    ) -> None:
        """``migrations``: a folder of the application's own ``NNNN_name.sql`` schema
        migrations, applied after Tierline's by ``tierline migrate``."""
        self.name = name
        self.handlers: dict[str, Handler] = {}
        self.queues: dict[str, QueueSpec] = {}  # app.queue(...): limits declared in code
        self.schedules: dict[str, Schedule] = {}  # app.schedule(...)
        self.database_url = database_url
        self.migrations = Path(migrations) if migrations is not None else None
        self._settings: Settings | None = None
        # The tier's queue once a tier runs this process, else a small pool of its own.
        self.producer = Producer(self, self.settings)

    # -- registration ---------------------------------------------------------------------
    def job(
        self,
        kind: str | None = None,
        *,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int = 5,
        timeout: float | None = None,
        uses_db: bool = False,
        executor: ExecutorName | None = None,
        unique: UniqueOption = None,
    ) -> Register:
        """Register a handler; returns its typed handle (``handles.py``). ``kind``
        defaults to the function's name.

        ``uses_db``: the handler borrows pool connections (``ctx.connection()``), so the
        worker's pool must have one per concurrent job.
        ``executor``: where a plain function runs, ``"thread"`` or ``"process"`` (a
        child process, killed on timeout); default ``TIERLINE_WORKER_EXECUTOR``.
        ``unique``: at most one such job at a time (``True``: by kind and all arguments;
        ``tierline.Unique(...)`` for chosen arguments or a period); an enqueue may override.
        """
        options = JobOptions(
            kind, queue, priority, max_attempts, timeout, uses_db, executor, unique
        )
        return Register(self, options)

    def add(self, options: JobOptions, func: Callable[..., Any]) -> Handler:
        """Register ``func`` under ``options`` (what ``@app.job`` does)."""
        name = options.kind or func.__name__
        JobRequest(
            kind=name,
            queue=options.queue,
            priority=options.priority,
            max_attempts=options.max_attempts,
            timeout_s=options.timeout,
        )  # same rules as enqueue
        if name in self.handlers:
            raise ValueError(f"job kind {name!r} is registered twice")
        check_executor(name, func, options.executor, options.uses_db)
        model, wants_context = signature_model(name, func)
        handler = self.handlers[name] = Handler(
            kind=name,
            func=func,
            queue=options.queue,
            priority=options.priority,
            max_attempts=options.max_attempts,
            timeout=options.timeout,
            uses_db=options.uses_db,
            is_async=inspect.iscoroutinefunction(func),
            wants_context=wants_context,
            model=model,
            executor=options.executor,
            unique=options.unique,
        )
        return handler

    def include(self, other: App) -> None:
        """Serve ``other``'s job kinds too (e.g. a library's jobs in an application)."""
        for handler in other.handlers.values():
            if handler.kind in self.handlers:
                raise ValueError(f"job kind {handler.kind!r} is registered twice")
            self.handlers[handler.kind] = handler

    def kinds(self) -> list[str]:
        return sorted(self.handlers)

    def handler(self, kind: str) -> Handler:
        try:
            return self.handlers[kind]
        except KeyError:
            raise UnknownKind(kind, self.kinds()) from None

    def prepare(
        self, request: JobRequest, *, max_args_bytes: int = MAX_ARGS_BYTES
    ) -> dict[str, Any]:
        """Validate a request and fill in the handler's defaults: the row to insert, without
        the columns that stay NULL."""
        handler = self.handler(request.kind)
        _check_size(request.args, max_args_bytes)
        return self._row(request, handler, handler.validate(request.args), tracing.carrier())

    def prepare_many(
        self, requests: Sequence[JobRequest], *, max_args_bytes: int = MAX_ARGS_BYTES
    ) -> list[dict[str, Any]]:
        """``prepare`` for a batch, the same rows: each kind's arguments are validated in
        one call (pydantic's loop, not ours) and the trace context is read once. When any
        request is invalid, the requests are prepared one by one, so the error raised is
        the first invalid request's, as ``prepare`` words it."""
        try:
            return self._prepare_batch(requests, max_args_bytes)
        except InvalidJob:
            return [self.prepare(r, max_args_bytes=max_args_bytes) for r in requests]

    def _prepare_batch(
        self, requests: Sequence[JobRequest], max_args_bytes: int
    ) -> list[dict[str, Any]]:
        by_kind: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            self.handler(request.kind)
            _check_size(request.args, max_args_bytes)
            by_kind.setdefault(request.kind, []).append(i)
        args: list[dict[str, Any]] = [{}] * len(requests)
        for kind, positions in by_kind.items():
            valid = self.handlers[kind].validate_many([requests[i].args for i in positions])
            for i, value in zip(positions, valid, strict=True):
                args[i] = value
        carrier = tracing.carrier()
        return [
            self._row(r, self.handlers[r.kind], a, carrier)
            for r, a in zip(requests, args, strict=True)
        ]

    @staticmethod
    def _row(
        request: JobRequest,
        handler: Handler,
        args: dict[str, Any],
        trace_context: dict[str, str] | None,
    ) -> dict[str, Any]:
        """The row to insert, without the columns that stay NULL (``enqueue.ROW_KEYS``):
        a batch sends the rows as they are, as JSON (`jsonb_to_recordset` reads a missing
        key as NULL), so what is left out is neither built, encoded, sent nor parsed."""
        queue = request.queue or handler.queue
        row: dict[str, Any] = {
            "queue": queue,
            "kind": request.kind,
            "priority": handler.priority if request.priority is None else request.priority,
            "max_attempts": request.max_attempts or handler.max_attempts,
        }
        if args:
            row["args"] = args
        # The database turns a delay into a time (its clock, not this replica's).
        if request.run_at is not None:
            row["run_at"] = request.run_at
        if request.delay_s:
            row["delay_s"] = request.delay_s
        timeout = request.timeout_s if request.timeout_s is not None else handler.timeout
        if timeout is not None:
            row["timeout_s"] = timeout
        if request.idempotency_key is not None:
            row["idempotency_key"] = request.idempotency_key
        if trace_context:  # None unless OpenTelemetry is configured
            row["trace_context"] = trace_context
        unique = resolve(handler.unique if request.unique is None else request.unique)
        if unique is not None:
            row.update(key_parts(unique, request.kind, queue, args))
        return row

    # -- flow control ---------------------------------------------------------------------
    def queue(
        self,
        name: str,
        *,
        max_running: int | None = None,
        rate_limit: str | None = None,
        partition_by: str | None = None,
    ) -> QueueSpec:
        """Declare a queue's cluster-wide limits (``limits.py``): at most ``max_running``
        of its jobs at once, at most ``rate_limit`` (``"20/s"``, ``"100/m"``) started,
        per value of the argument ``partition_by`` when given. Workers store them at
        start; a live change (``PATCH /v1/queues/{name}``) wins until reset."""
        spec = QueueSpec.make(name, max_running, rate_limit, partition_by)
        self.queues[name] = spec
        return spec

    def schedule(
        self,
        job: Any,
        *,
        cron: str | None = None,
        every_s: float | None = None,
        args: dict[str, Any] | None = None,
        name: str | None = None,
        timezone: str = "UTC",
        catch_up: bool = True,
    ) -> Schedule:
        """Enqueue ``job`` (a handle or a kind) on a schedule (``schedules.py``): a cron
        expression (5 fields, or 6 with seconds first) in ``timezone``, or every
        ``every_s`` seconds. One job per slot however many workers run; after downtime
        the missed slots make one run (``catch_up``) or none."""
        kind = job if isinstance(job, str) else str(getattr(job, "kind", ""))
        schedule = Schedule.make(kind, cron, every_s, args or {}, name, timezone, catch_up)
        if schedule.name in self.schedules:
            raise ValueError(f"schedule {schedule.name!r} is declared twice; give name=")
        if kind in self.handlers:
            self.handlers[kind].validate(schedule.args)
        self.schedules[schedule.name] = schedule
        return schedule

    # -- enqueue --------------------------------------------------------------------------
    async def enqueue(
        self,
        kind: str,
        args: dict[str, Any] | None = None,
        *,
        connection: AnyConnection | None = None,
        **options: Any,
    ) -> Job:
        """Enqueue one job; returns it (the existing one for a repeated idempotency key).
        ``connection``: the caller's ``psycopg.AsyncConnection``, whose transaction the
        job joins (invisible to workers until it commits, gone if it rolls back)."""
        request = JobRequest(kind=kind, args=args or {}, **options)
        if connection is None:
            queue = await self.producer.queue()
            job, _created = await queue.enqueue(request)
            return job
        steps = enqueueing.one(self, request, self.producer.max_args_bytes())
        job, _created = await enqueueing.on_connection(_async(connection), steps)
        return job

    async def enqueue_many(
        self, requests: Sequence[JobRequest], *, connection: AnyConnection | None = None
    ) -> list[int]:
        """Enqueue many jobs in one round trip and one transaction; returns their ids (a
        repeated idempotency key gives the existing job's id)."""
        steps = enqueueing.many(self, requests, self.producer.max_args_bytes(), jobs=False)
        return [job_id for job_id, _ in await self._run(steps, connection)]

    async def enqueue_jobs(
        self, requests: Sequence[JobRequest], *, connection: AnyConnection | None = None
    ) -> list[Job]:
        """``enqueue_many``, answering the jobs."""
        steps = enqueueing.many(self, requests, self.producer.max_args_bytes(), jobs=True)
        return [job for job, _ in await self._run(steps, connection)]

    def enqueue_sync(
        self,
        kind: str,
        args: dict[str, Any] | None = None,
        *,
        connection: AnyConnection | None = None,
        **options: Any,
    ) -> Job:
        """``enqueue`` for synchronous code (scripts, sync web frameworks, plain-function
        handlers): the same implementation, run to completion. ``connection``: the
        caller's ``psycopg.Connection``, whose transaction the job joins."""
        if connection is None:
            return self.producer.call(lambda: self.enqueue(kind, args, **options))
        if not isinstance(connection, psycopg.Connection):
            raise TypeError("enqueue_sync takes a psycopg.Connection; await enqueue() instead")
        request = JobRequest(kind=kind, args=args or {}, **options)
        steps = enqueueing.one(self, request, self.producer.max_args_bytes())
        job, _created = enqueueing.on_sync_connection(connection, steps)
        return job

    def bind(self, queue: Queue) -> None:
        """Make ``enqueue`` use a running tier's queue (and pool); on the tier's loop."""
        self.producer.bind(queue)

    async def _run(self, steps: enqueueing.Steps[T], connection: AnyConnection | None) -> T:
        if connection is None:
            return await enqueueing.on_pool((await self.producer.queue()).pool, steps)
        return await enqueueing.on_connection(_async(connection), steps)

    def settings(self) -> Settings:
        """Where a process that runs no tier enqueues: ``database_url``, else the
        ``TIERLINE_*`` settings (a script has no CLI to read them for it). Read once."""
        if self._settings is None:
            self._settings = Settings.from_env(database_url=self.database_url)
        return self._settings


class JobOptions(NamedTuple):
    """What ``@app.job(...)`` was given."""

    kind: str | None
    queue: str
    priority: int
    max_attempts: int
    timeout: float | None
    uses_db: bool
    executor: ExecutorName | None = None
    unique: UniqueOption = None


class Register:
    """``@app.job(...)``: registers the function and returns its typed handle."""

    def __init__(self, app: App, options: JobOptions) -> None:
        self.app = app
        self.options = options

    @overload
    def __call__(self, func: Callable[Concatenate[JobContext, P], R]) -> ContextJobHandle[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, R]) -> JobHandle[P, R]: ...

    def __call__(self, func: Callable[..., Any]) -> Any:
        handler = self.app.add(self.options, func)
        handle = ContextJobHandle if handler.wants_context else JobHandle
        return handle(self.app, handler.kind, func, HandleOptions())


def _check_size(args: dict[str, Any], max_args_bytes: int) -> None:
    """Arguments as sent, measured before validation (which would turn 1e400 into null
    silently)."""
    if not args:
        return
    try:
        too_big = json_size(args) > max_args_bytes
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") is not valid Unicode
        raise InvalidJob("args hold a string that is not valid Unicode") from None
    except ValueError:  # NaN, or infinity (what 1e400 parses to)
        raise InvalidJob("args hold a number JSON cannot carry (NaN or infinity)") from None
    if too_big:
        raise InvalidJob(f"args are larger than {max_args_bytes} bytes")


def _async(connection: AnyConnection) -> psycopg.AsyncConnection[Any]:
    if not isinstance(connection, psycopg.AsyncConnection):
        raise TypeError("enqueue takes a psycopg.AsyncConnection; use enqueue_sync instead")
    return connection
