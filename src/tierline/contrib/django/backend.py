"""``TierlineBackend``: Django's Tasks framework enqueueing onto Tierline's queue.

Every enqueue and every result read goes through the connection Django already has for
``OPTIONS["DATABASE"]`` (default ``"default"``), whose database holds Tierline's schema.
That connection is the caller's transaction: an enqueue inside ``transaction.atomic()``
commits with the block's writes and is gone if the block (or a savepoint of it) rolls
back; outside one, Django's autocommit commits it at once. A task enqueued from
``transaction.on_commit(...)`` (what Django's documentation recommends) is inserted after
the commit, in autocommit. docs/django.md compares the two.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.utils import timezone
from psycopg.rows import dict_row
from psycopg.types.json import JsonbLoader

from tierline.contrib.django import framework, results
from tierline.contrib.django.jobs import KIND, app
from tierline.queries import QUERIES


class TierlineBackend(framework.BaseTaskBackend):  # type: ignore[misc]
    """A Django task backend whose tasks run on Tierline's worker tier.

    ``OPTIONS``: ``DATABASE`` (the Django database alias with Tierline's schema; default
    ``"default"``), ``MAX_ATTEMPTS`` (runs of a task that raises, default 1: Django's
    tasks do not retry), ``TIMEOUT_S`` (seconds one run may take; default none).
    """

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True  # Django's -100..100, higher first: Tierline's own range

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.database = self.options.get("DATABASE", DEFAULT_DB_ALIAS)
        self.max_attempts = int(self.options.get("MAX_ATTEMPTS", 1))
        timeout = self.options.get("TIMEOUT_S")
        self.timeout_s = float(timeout) if timeout is not None else None

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        self.validate_task(task)
        run_at = _aware(task.run_after) if task.run_after is not None else None
        spec = {
            "task": task.module_path,
            "args": framework.normalize_json(list(args)),
            "kwargs": framework.normalize_json(dict(kwargs)),
            "backend": self.alias,
            "run_after": run_at.isoformat() if run_at is not None else None,
        }
        with _joined(self.database) as conn:
            job = app.enqueue_sync(
                KIND,
                spec,
                connection=conn,
                queue=task.queue_name,
                priority=task.priority,
                run_at=run_at,
                max_attempts=self.max_attempts,
                timeout_s=self.timeout_s,
            )
        result = framework.TaskResult(
            task=task,
            id=str(job.id),
            status=framework.TaskResultStatus.READY,
            enqueued_at=job.created_at,
            started_at=None,
            finished_at=None,
            last_attempted_at=None,
            args=spec["args"],
            kwargs=spec["kwargs"],
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        framework.task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> Any:
        """The task's result as Tierline has it now (read in the caller's transaction)."""
        try:
            job_id = int(result_id)
        except (TypeError, ValueError):
            raise framework.TaskResultDoesNotExist(result_id) from None
        with _joined(self.database) as conn:
            cur = conn.cursor(row_factory=dict_row)
            # Django loads jsonb as text (its JSONField decodes); this cursor decodes it.
            cur.adapters.register_loader("jsonb", JsonbLoader)
            cur.execute(QUERIES["get_job"], {"id": job_id})
            row = cur.fetchone()
        if row is None or row["kind"] != KIND:
            raise framework.TaskResultDoesNotExist(result_id)
        return results.from_row(row, self.alias)


@contextmanager
def _joined(alias: str) -> Iterator[psycopg.Connection[Any]]:
    """The psycopg connection under Django's for ``alias``, in its transaction if it is
    in one. An error inside marks an atomic block for rollback, as Django's own queries
    do, so the block cannot go on to commit writes that went with a failed enqueue."""
    wrapper = connections[alias]
    if wrapper.vendor != "postgresql":
        raise ImproperlyConfigured(
            f"TierlineBackend needs PostgreSQL; DATABASES[{alias!r}] is {wrapper.vendor}"
        )
    wrapper.ensure_connection()
    if wrapper.in_atomic_block:
        wrapper.validate_no_broken_transaction()
    raw = wrapper.connection
    if not isinstance(raw, psycopg.Connection):
        raise ImproperlyConfigured(
            "TierlineBackend needs Django's psycopg (3) driver; this connection is "
            f"{type(raw).__module__}.{type(raw).__name__}"
        )
    with transaction.mark_for_rollback_on_error(alias):
        yield raw


def _aware(value: datetime) -> datetime:
    """Django allows naive ``run_after`` without ``USE_TZ``: local time, as Django's."""
    if timezone.is_naive(value):
        value = timezone.make_aware(value)
    return value.astimezone(UTC)
