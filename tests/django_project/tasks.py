"""The test project's tasks, as an application writes them."""

# Django ships no types, so its @task decorator is untyped to mypy.
# mypy: disallow-untyped-decorators=False

from __future__ import annotations

from typing import Any

from django.db import connection

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
