"""A registered handler: the function behind a job kind, its defaults, and the model of
its arguments that every enqueue is validated against (``App.prepare``). Not to be
confused with ``handles.py``, the typed handle ``@app.job`` gives the caller."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model

from tierline.errors import InvalidJob
from tierline.executors import ExecutorName
from tierline.unique import UniqueOption


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
    executor: ExecutorName | None = None  # None: TIERLINE_WORKER_EXECUTOR's (executors/)
    unique: UniqueOption = None  # the kind's default (unique.py)

    def validate(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check ``args`` against the handler's signature; return them JSON-ready."""
        if not args:  # the same answer every time: {} (nothing set), or the missing ones
            error = self._no_args
            if error is not None:
                raise InvalidJob(error)
            return {}
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

    def validate_many(self, many: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``validate`` for many: one pydantic call for them all (a batch spent a third of
        its client time calling ``validate`` per job). InvalidJob names no job; the
        caller finds the first invalid one with ``validate``."""
        if not any(many):  # no arguments at all: one check answers for every job
            self.validate({})
            return [{} for _ in many]
        try:
            adapter = self._many
            valid: list[dict[str, Any]] = adapter.dump_python(
                adapter.validate_python(many), mode="json", exclude_unset=True
            )
        except (ValidationError, ValueError):  # UnicodeEncodeError is a ValueError
            raise InvalidJob(f"invalid args for {self.kind!r}") from None
        return valid

    @cached_property
    def _no_args(self) -> str | None:
        """What validating ``{}`` says: None (valid: ``{}``, as no field is set), or the
        error's message (a required argument is missing)."""
        try:
            self.model.model_validate({})
        except ValidationError as exc:
            return f"invalid args for {self.kind!r}: {_summary(exc)}"
        return None

    @cached_property
    def _many(self) -> TypeAdapter[list[Any]]:
        """The list validator of ``model``, made on the handler's first batch."""
        return TypeAdapter(list[self.model])  # type: ignore[name-defined]


def signature_model(kind: str, func: Callable[..., Any]) -> tuple[type[BaseModel], bool]:
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
