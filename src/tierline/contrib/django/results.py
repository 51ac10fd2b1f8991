"""A Tierline job seen as a Django ``TaskResult``: states, errors, the return value.

=================================  ==========================
Tierline state                     ``TaskResultStatus``
=================================  ==========================
scheduled, available, retrying     READY (waiting to run, or to run again)
running                            RUNNING
succeeded                          SUCCESSFUL (``return_value`` is the job's ``result``)
failed, cancelled                  FAILED (``errors`` holds the job's ``error``)
=================================  ==========================
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from django.utils import timezone
from django.utils.module_loading import import_string

from tierline.contrib.django import framework
from tierline.jobs import State

STATUS = {
    State.scheduled: "READY",
    State.available: "READY",
    State.retrying: "READY",
    State.running: "RUNNING",
    State.succeeded: "SUCCESSFUL",
    State.failed: "FAILED",
    State.cancelled: "FAILED",
}
# What the worker records for its own outcomes (worker.py), as importable classes.
OWN_TYPES = {
    "Retry": "tierline.outcomes.Retry",
    "Cancel": "tierline.outcomes.Cancel",
    "Cancelled": "asyncio.CancelledError",
}


def status(state: str) -> Any:
    return framework.TaskResultStatus(STATUS[State(state)])


def load_task(path: str, *, backend: str, queue: str, priority: int | None = None) -> Any:
    """The ``Task`` at ``path`` with the options it was enqueued with."""
    found = import_string(path)
    if not isinstance(found, framework.Task):
        raise TypeError(f"{path!r} is not a Django task (decorate it with @task)")
    return found.using(backend=backend, queue_name=queue, priority=priority)


def from_row(row: dict[str, Any], backend: str) -> Any:
    """The ``TaskResult`` of the job in ``row`` (a ``tierline.jobs`` row, JSON decoded)."""
    spec = row["args"]
    task = load_task(spec["task"], backend=backend, queue=row["queue"], priority=row["priority"])
    if spec.get("run_after"):
        task = task.using(run_after=django_time(datetime.fromisoformat(spec["run_after"])))
    result = framework.TaskResult(
        task=task,
        id=str(row["id"]),
        status=status(row["state"]),
        enqueued_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"] if row["state"] in _FINISHED else None,
        last_attempted_at=row["started_at"],
        args=spec.get("args", []),
        kwargs=spec.get("kwargs", {}),
        backend=backend,
        errors=[error(row["error"])] if row["error"] else [],
        # Tierline counts attempts and knows the last worker, not each attempt's worker.
        worker_ids=[str(row.get("lease_owner") or "tierline")] * row["attempt"],
    )
    if row["state"] == State.succeeded:
        object.__setattr__(result, "_return_value", row["result"])
    return result


_FINISHED = {State.succeeded, State.failed, State.cancelled}


def error(recorded: dict[str, Any]) -> Any:
    """A ``TaskError`` from the job's ``error`` (``{"type", "message", "traceback"}``)."""
    name = str(recorded.get("type") or "Exception")
    trace = recorded.get("traceback") or f"{name}: {recorded.get('message', '')}\n"
    return framework.TaskError(exception_class_path=class_path(name, trace), traceback=trace)


def class_path(name: str, trace: str) -> str:
    """The importable path of the exception class the worker recorded by its bare name.

    Python's traceback names a class ``module.Qualname`` on its last line, except for
    built-ins (``ValueError: ...``), so the last line that starts with the name says it.
    """
    if name in OWN_TYPES:
        return OWN_TYPES[name]
    line = re.compile(rf"^((?:[\w.]+\.)?{re.escape(name)})(?::|$)", re.MULTILINE)
    found = line.findall(trace)
    path = found[-1] if found else name
    return path if "." in path else f"builtins.{path}"


def django_time(value: datetime) -> datetime:
    """``value`` as Django holds times: aware with ``USE_TZ``, naive local time without."""
    from django.conf import settings

    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    if settings.USE_TZ:
        return value
    naive: datetime = timezone.make_naive(value)
    return naive
