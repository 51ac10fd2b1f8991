"""The test project's tasks, as an application writes them."""

# Django ships no types, so its @task decorator is untyped to mypy.
# mypy: disallow-untyped-decorators=False

from __future__ import annotations

from typing import Any

from django.db import connection

from tierline import Retry
from tierline.contrib.django.framework import task


class PaymentDeclined(Exception):
    """A task's own exception, so its class path is not a built-in's."""


@task
def add(a: int, b: int) -> int:
    return a + b


@task
def decline(card: str) -> None:
    raise PaymentDeclined(f"card {card} declined")


@task(takes_context=True)
def whoami(context: Any, tag: str) -> dict[str, Any]:
    return {"id": context.task_result.id, "attempt": context.attempt, "tag": tag}


@task
async def double(x: int) -> int:
    return 2 * x


@task(queue_name="reports")
def note(text: str) -> int:
    """Writes through Django's connection in the worker; answers the notes' count."""
    with connection.cursor() as cur:
        cur.execute("INSERT INTO django_notes (text) VALUES (%s)", [text])
        cur.execute("SELECT count(*) FROM django_notes")
        (count,) = cur.fetchone()
    return int(count)


@task(takes_context=True)
def flaky(context: Any) -> int:
    """Asks for another attempt the first time; answers the attempt that succeeded."""
    if context.attempt == 1:
        raise Retry(0.1, "not yet")
    return int(context.attempt)
