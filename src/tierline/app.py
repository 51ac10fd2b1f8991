"""The application: job handlers registered with ``@app.job`` and the enqueue API."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from tierline.errors import InvalidJob, UnknownKind
from tierline.jobs import Job, JobRequest, json_size
from tierline.producer import Producer
from tierline.queue import MAX_ARGS_BYTES, Queue
from tierline.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Handler:
    kind: str
    func: Callable[..., Any]
    queue: str
    priority: int
    max_attempts: int
    timeout: float | None
    uses_db: bool
    is_async: bool
    wants_context: bool
    model: type[BaseModel]

    def validate(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check ``args`` against the handler's signature; return them JSON-ready."""
        try:
            return self.model.model_validate(args).model_dump(mode="json", exclude_unset=True)
        except ValidationError as exc:
            raise InvalidJob(f"invalid args for {self.kind!r}: {_summary(exc)}") from None
        except UnicodeEncodeError:  # a lone surrogate ("\udfff"), e.g. in a key of an Any
            raise InvalidJob(
                f"invalid args for {self.kind!r}: a string is not valid Unicode"
            ) from None
        except ValueError as exc:  # e.g. "Maximum serialization depth exceeded" (> 255 levels)
            raise InvalidJob(f"invalid args for {self.kind!r}: {exc}") from None


class App:
    """A Tierline application: a registry of job handlers.

    >>> app = App()
    >>> @app.job(queue="emails", max_attempts=3)
    ... async def send(ctx, to: str) -> None: ...
    """

    def __init__(self, name: str = "tierline", *, database_url: str | None = None) -> None:
        self.name = name
        self.handlers: dict[str, Handler] = {}
        self.database_url = database_url
        # The tier's queue once a tier runs this process, else a small pool of its own.
        self.producer = Producer(self, self._private_pool)

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
    ) -> Callable[[F], F]:
        """Register a handler. ``kind`` defaults to the function's name.

        ``uses_db``: the handler borrows pool connections (``ctx.connection()``), so the
        worker's pool must have one per concurrent job.
        """

        def register(func: F) -> F:
            name = kind or func.__name__
            JobRequest(
                kind=name,
                queue=queue,
                priority=priority,
                max_attempts=max_attempts,
                timeout_s=timeout,
            )  # same rules as enqueue
            if name in self.handlers:
                raise ValueError(f"job kind {name!r} is registered twice")
            model, wants_context = _signature_model(name, func)
            self.handlers[name] = Handler(
                kind=name,
                func=func,
                queue=queue,
                priority=priority,
                max_attempts=max_attempts,
                timeout=timeout,
                uses_db=uses_db,
                is_async=inspect.iscoroutinefunction(func),
                wants_context=wants_context,
                model=model,
            )
            return func

        return register

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
        """Validate a request and fill in the handler's defaults: the row to insert."""
        handler = self.handler(request.kind)
        # Measured as sent, before validation, which would turn 1e400 into null silently.
        try:
            too_big = bool(request.args) and json_size(request.args) > max_args_bytes
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") is not valid Unicode
            raise InvalidJob("args hold a string that is not valid Unicode") from None
        except ValueError:  # NaN, or infinity (what 1e400 parses to)
            raise InvalidJob("args hold a number JSON cannot carry (NaN or infinity)") from None
        if too_big:
            raise InvalidJob(f"args are larger than {max_args_bytes} bytes")
        args = handler.validate(request.args)
        return {
            "queue": request.queue or handler.queue,
            "kind": request.kind,
            "args": args,
            "priority": handler.priority if request.priority is None else request.priority,
            # The database turns a delay into a time (its clock, not this replica's).
            "run_at": request.run_at,
            "delay_s": request.delay_s or None,
            "max_attempts": request.max_attempts or handler.max_attempts,
            "timeout_s": request.timeout_s if request.timeout_s is not None else handler.timeout,
            "idempotency_key": request.idempotency_key,
        }

    # -- enqueue --------------------------------------------------------------------------
    async def enqueue(self, kind: str, args: dict[str, Any] | None = None, **options: Any) -> Job:
        """Enqueue one job; returns it (the existing one for a repeated idempotency key)."""
        queue = await self.producer.queue()
        job, _created = await queue.enqueue(JobRequest(kind=kind, args=args or {}, **options))
        return job

    async def enqueue_many(self, requests: Sequence[JobRequest]) -> list[int]:
        """Enqueue many jobs in one round trip and one transaction; returns their ids (a
        repeated idempotency key gives the existing job's id)."""
        queue = await self.producer.queue()
        return [job_id for job_id, _ in await queue.enqueue_batch_ids(requests)]

    def enqueue_sync(self, kind: str, args: dict[str, Any] | None = None, **options: Any) -> Job:
        """``enqueue`` for synchronous code (scripts, sync web frameworks, plain-function
        handlers): the same implementation, run to completion."""
        return self.producer.call(lambda: self.enqueue(kind, args, **options))

    def bind(self, queue: Queue) -> None:
        """Make ``enqueue`` use a running tier's queue (and pool); on the tier's loop."""
        self.producer.bind(queue)

    async def _private_pool(self) -> tuple[str, int]:
        """Where a process that runs no tier enqueues: ``database_url``, else the
        ``TIERLINE_*`` settings (a script has no CLI to read them for it)."""
        settings = Settings.from_env(database_url=self.database_url)
        return settings.dsn(), settings.max_args_bytes


def _signature_model(kind: str, func: Callable[..., Any]) -> tuple[type[BaseModel], bool]:
    """A pydantic model of the handler's parameters (after the optional ``ctx``)."""
    params = list(inspect.signature(func).parameters.values())
    wants_context = bool(params) and params[0].name in ("ctx", "context")
    if wants_context:
        params = params[1:]
    fields: dict[str, Any] = {}
    extra = "forbid"
    hints = _hints(func)
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            extra = "allow"
            continue
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            raise TypeError(f"handler {kind!r}: parameters must be passable by keyword")
        annotation = hints.get(p.name, Any)
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (annotation, default)
    model = create_model(
        f"Args_{kind.replace('.', '_').replace(':', '_').replace('-', '_')}",
        __config__=ConfigDict(extra=extra, strict=False),  # type: ignore[typeddict-item]
        **fields,
    )
    return model, wants_context


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    try:
        import typing

        return typing.get_type_hints(func)
    except Exception:  # unresolvable forward references: validate loosely
        return {}


def _summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ())) or "args"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)
