"""The Python API: registering handlers and enqueueing from any process."""

from __future__ import annotations

import pytest

from tierline import App, JobContext
from tierline.errors import InvalidJob, UnknownKind
from tierline.jobs import JobRequest


def make_app(db_url: str) -> App:
    app = App("api-test", database_url=db_url)

    @app.job(queue="mail", priority=3, max_attempts=2, timeout=10)
    async def send(ctx: JobContext, to: str, subject: str = "hi") -> None:
        return None

    @app.job("resize-image")
    def resize(path: str, width: int = 800) -> None:
        return None

    return app


async def test_async_enqueue_uses_handler_defaults(db_url: str) -> None:
    app = make_app(db_url)
    job = await app.enqueue("send", {"to": "a@example.com"})
    assert (job.queue, job.priority, job.max_attempts, job.timeout_s) == ("mail", 3, 2, 10)
    assert job.args == {"to": "a@example.com"}
    ids = await app.enqueue_many(
        [JobRequest(kind="resize-image", args={"path": f"/p/{i}"}) for i in range(3)]
    )
    assert len(set(ids)) == 3
    with pytest.raises(UnknownKind):
        await app.enqueue("nope")
    with pytest.raises(InvalidJob, match="width"):
        await app.enqueue("resize-image", {"path": "x", "width": "wide"})


def test_sync_twin_and_idempotency(db_url: str) -> None:
    app = make_app(db_url)
    first = app.enqueue_sync("send", {"to": "b@example.com"}, idempotency_key="welcome-b")
    second = app.enqueue_sync("send", {"to": "b@example.com"}, idempotency_key="welcome-b")
    assert first.id == second.id and first.state == "available"


def test_registration_rules() -> None:
    app = App()

    @app.job()
    async def twice() -> None:
        return None

    with pytest.raises(ValueError, match="registered twice"):
        app.job("twice")(twice)
    with pytest.raises(TypeError, match="keyword"):

        @app.job()
        async def positional(*args: int) -> None:
            return None
