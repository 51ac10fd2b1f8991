"""The Tierline application that runs Django tasks: one job kind, ``django.task``, whose
arguments name the task by its module path and carry what it was called with.

The worker tier loads it through ``tierline.contrib.django.worker`` (which sets Django up
first); an application with kinds of its own adds it with ``app.include(jobs.app)``.
"""

from __future__ import annotations

from typing import Any

from django.db import close_old_connections
from django.utils import timezone

from tierline.app import App
from tierline.context import JobContext
from tierline.contrib.django import framework
from tierline.contrib.django.results import load_task

KIND = "django.task"
app = App("django")


@app.job(KIND, max_attempts=1)
def run_task(
    ctx: JobContext,
    task: str,
    args: list[Any],
    kwargs: dict[str, Any],
    backend: str = "default",
    run_after: str | None = None,
) -> Any:
    """Import the task at ``task`` and call it (a plain function: Tierline runs it in a
    thread, or a child process with ``executor="process"``).

    Django's connections belong to the thread that opened them and outlive the task:
    like a request, each task starts and ends by closing the ones that are broken or
    older than ``CONN_MAX_AGE``, so a connection the server dropped is not reused.
    """
    close_old_connections()
    try:
        target = load_task(task, backend=backend, queue=ctx.queue)
        result = framework.TaskResult(
            task=target,
            id=str(ctx.job_id),
            status=framework.TaskResultStatus.RUNNING,
            enqueued_at=None,
            started_at=timezone.now(),
            finished_at=None,
            last_attempted_at=timezone.now(),
            args=args,
            kwargs=kwargs,
            backend=backend,
            errors=[],
            worker_ids=["tierline"] * ctx.attempt,
        )
        return _call(target, result, args, kwargs)
    finally:
        close_old_connections()


def _call(target: Any, result: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Run the task with Django's signals around it; its return value, JSON-ready."""
    sender = type(target.get_backend())
    framework.task_started.send(sender=sender, task_result=result)
    try:
        if target.takes_context:
            value = target.call(framework.TaskContext(task_result=result), *args, **kwargs)
        else:
            value = target.call(*args, **kwargs)
        value = framework.normalize_json(value)
    except BaseException:
        # The worker records the error (type, message, traceback) and retries or fails.
        _finish(result, framework.TaskResultStatus.FAILED)
        framework.task_finished.send(sender=sender, task_result=result)
        raise
    _finish(result, framework.TaskResultStatus.SUCCESSFUL)
    object.__setattr__(result, "_return_value", value)
    framework.task_finished.send(sender=sender, task_result=result)
    return value


def _finish(result: Any, status: Any) -> None:
    object.__setattr__(result, "status", status)
    object.__setattr__(result, "finished_at", timezone.now())
