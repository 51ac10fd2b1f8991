"""Server-sent event streams: one job's events, and the firehose of all jobs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from tierline import metrics
from tierline.jobs import KIND_PATTERN, QUEUE_PATTERN
from tierline.logs import get_logger
from tierline.streaming import StreamClosed, Subscription, parse_firehose_id
from tierline.web.errors import COMMON, ApiError, ErrorResponse
from tierline.web.jobs import JobId
from tierline.web.runtime import Runtime, runtime

log = get_logger(__name__)
router = APIRouter(prefix="/v1", tags=["events"], responses=COMMON)

SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "An SSE stream."},
    404: {"model": ErrorResponse},
}


def _reader(request: Request, rt: Runtime = Depends(runtime)) -> Runtime:
    rt.keys.check(request, "read")
    return rt


@router.get("/jobs/{job_id}/events", responses=SSE_DOC, response_model=None)
async def job_events(
    job_id: JobId,
    request: Request,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=2**31 - 1, description="Resume after this seq (like Last-Event-ID)."),
    ] = None,
    rt: Runtime = Depends(_reader),
) -> EventSourceResponse:
    """A job's events: the stored ones after `Last-Event-ID`, then live ones; the stream
    ends after the final event (`succeeded`, `failed`, `cancelled`)."""
    position = after or 0
    if last_event_id is not None and last_event_id.strip():
        if not last_event_id.strip().isdigit() or int(last_event_id) >= 2**31:
            raise ApiError(
                400, "bad_request", "Last-Event-ID must be the seq number of an event of this job"
            )
        position = int(last_event_id)
    await rt.require_queue().get(job_id)  # 404 for an unknown job
    sub = Subscription(rt.hub, job_id=job_id, after=position)
    return _stream(rt, sub, request, firehose=False)


@router.get("/events", responses=SSE_DOC, response_model=None)
async def firehose(
    request: Request,
    queue: Annotated[list[str] | None, Query(description="Only these queues.")] = None,
    kind: Annotated[list[str] | None, Query(description="Only these kinds.")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    rt: Runtime = Depends(_reader),
) -> EventSourceResponse:
    """Every job's state changes from now on (or after `Last-Event-ID`), filterable."""
    import re

    for q in queue or []:
        if not re.match(QUEUE_PATTERN, q):
            raise ApiError(422, "invalid_request", f"queue: invalid queue name {q[:50]!r}")
    for k in kind or []:
        if not re.match(KIND_PATTERN, k):
            raise ApiError(422, "invalid_request", f"kind: invalid kind {k[:50]!r}")
    rt.require_queue()
    if last_event_id is not None and last_event_id.strip():
        try:
            position = parse_firehose_id(last_event_id)
        except ValueError as exc:
            raise ApiError(400, "bad_request", f"Last-Event-ID: {exc}") from None
    else:
        position = await rt.hub.firehose_head()
    sub = Subscription(
        rt.hub,
        job_id=None,
        after=position,
        queues=frozenset(queue or ()),
        kinds=frozenset(kind or ()),
    )
    return _stream(rt, sub, request, firehose=True)


def _stream(
    rt: Runtime, sub: Subscription, request: Request, *, firehose: bool
) -> EventSourceResponse:
    if rt.hub.active >= rt.settings.sse_max_streams:
        raise ApiError(
            503,
            "too_many_streams",
            f"this replica serves at most {rt.settings.sse_max_streams} streams; "
            "retry (another replica may have room)",
            headers={"Retry-After": "1"},
        )

    async def events() -> AsyncIterator[ServerSentEvent]:
        await rt.hub.subscribe(sub)
        try:
            async for ev in sub.events():
                metrics.SSE_EVENTS.inc()
                yield ServerSentEvent(
                    data=json.dumps(ev.payload(), separators=(",", ":"), default=str),
                    event=ev.type,
                    id=ev.firehose_id if firehose else str(ev.seq),
                )
        except StreamClosed:
            log.info("slow SSE client disconnected; it may resume", job_id=sub.job_id)
        finally:
            rt.hub.unsubscribe(sub)

    headers: dict[str, Any] = {"X-Accel-Buffering": "no", "Cache-Control": "no-store"}
    return EventSourceResponse(
        events(),
        headers=headers,
        ping=rt.settings.sse_heartbeat_s,
        send_timeout=30,
        shutdown_event=rt.shutdown,
    )
