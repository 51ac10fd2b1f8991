"""Server-sent event streams: one job's events, and the firehose of all jobs.

Both resume with ``Last-Event-ID`` on any replica: ids are database positions (a job's
event seq; ``XID-ID`` on the firehose), never per-process counters.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from tierline import metrics
from tierline.jobs import FINAL_STATES, KIND_PATTERN, QUEUE_PATTERN
from tierline.logs import get_logger
from tierline.sse import MAX_SEQ, SEP, parse_firehose_id, parse_seq
from tierline.streaming import StreamClosed, Subscription
from tierline.web.errors import COMMON, ApiError, ErrorResponse
from tierline.web.jobs import JobId
from tierline.web.runtime import Runtime, scoped

log = get_logger(__name__)
router = APIRouter(prefix="/v1", tags=["events"], responses=COMMON)

# How long a browser's EventSource waits before it reconnects (milliseconds); sent once
# at the start of every stream.
RECONNECT_MS = 1000
# A send that waits this long for the client's socket ends the stream (seconds).
SEND_TIMEOUT_S = 30

SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "An SSE stream."},
    204: {"description": "The job has finished and the client has every event."},
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
}


@router.get("/jobs/{job_id}/events", responses=SSE_DOC, response_model=None)
async def job_events(
    job_id: JobId,
    request: Request,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, description="Resume after this seq (like Last-Event-ID)."),
    ] = None,
    rt: Runtime = scoped("read"),
) -> Response:
    """A job's events: the stored ones after `Last-Event-ID` (or `after`), then live ones;
    the stream ends after the final event (`succeeded`, `failed`, `cancelled`). Resuming
    after the final event answers 204, which tells a browser's EventSource to stop."""
    position = after or 0
    if last_event_id is not None and last_event_id.strip():
        try:
            position = parse_seq(last_event_id)
        except ValueError as exc:
            raise ApiError(400, "bad_request", f"Last-Event-ID: {exc}") from None
    rt.require_queue()
    head = await rt.hub.job_head(job_id, position)
    if head is None:
        raise ApiError(404, "not_found", f"job {job_id} not found")
    state, last_seq = head
    if position > last_seq:
        raise ApiError(
            400,
            "bad_request",
            f"Last-Event-ID: {position} is beyond job {job_id}'s last event ({last_seq})",
        )
    if state in FINAL_STATES and position == last_seq:
        return Response(status_code=204)
    sub = Subscription(rt.hub, job_id=job_id, after=position, head=last_seq)
    return await _stream(rt, sub, firehose=False)


@router.get("/events", responses=SSE_DOC, response_model=None)
async def firehose(
    request: Request,
    queue: Annotated[list[str] | None, Query(description="Only these queues.")] = None,
    kind: Annotated[list[str] | None, Query(description="Only these kinds.")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    rt: Runtime = scoped("read"),
) -> Response:
    """Every job's events from now on (or after `Last-Event-ID`, an `XID-ID` as sent in
    the `id:` field), filterable by queue and kind (each may repeat)."""
    for q in queue or []:
        if not re.match(QUEUE_PATTERN, q):
            raise ApiError(422, "invalid_request", f"queue: invalid queue name {q[:50]!r}")
    for k in kind or []:
        if not re.match(KIND_PATTERN, k):
            raise ApiError(422, "invalid_request", f"kind: invalid kind {k[:50]!r}")
    position: tuple[int, int, int] | None = None
    if last_event_id is not None and last_event_id.strip():
        try:
            position = parse_firehose_id(last_event_id)
        except ValueError as exc:
            raise ApiError(400, "bad_request", f"Last-Event-ID: {exc}") from None
    rt.require_queue()
    if position is None:
        position = await rt.hub.firehose_head()
    sub = Subscription(
        rt.hub,
        job_id=None,
        after=position,
        queues=frozenset(queue or ()),
        kinds=frozenset(kind or ()),
    )
    return await _stream(rt, sub, firehose=True)


async def _stream(rt: Runtime, sub: Subscription, *, firehose: bool) -> Response:
    if rt.draining:
        raise ApiError(
            503, "not_ready", "replica shutting down; reconnect", headers={"Retry-After": "1"}
        )
    if rt.hub.active >= rt.settings.sse_max_streams:
        raise ApiError(
            503,
            "too_many_streams",
            f"this replica serves at most {rt.settings.sse_max_streams} streams; "
            "retry (another replica may have room)",
            headers={"Retry-After": "1"},
        )
    # Registered now, not when the body starts, so the cap holds under a burst of
    # connections; `EventStream` forgets it however the response ends.
    await rt.hub.subscribe(sub)

    async def events() -> AsyncIterator[ServerSentEvent | bytes]:
        try:
            yield ServerSentEvent(comment="tierline", retry=RECONNECT_MS)
            async for ev in sub.events():
                metrics.SSE_EVENTS.inc()
                yield ev.frame(firehose)
        except StreamClosed:
            pass  # EventStream logs it
        finally:
            rt.hub.unsubscribe(sub)

    headers: dict[str, Any] = {"X-Accel-Buffering": "no", "Cache-Control": "no-store"}
    return EventStream(
        rt,
        sub,
        events(),
        headers=headers,
        ping=rt.settings.sse_heartbeat_s,
        sep=SEP,  # the frames come encoded with it
        send_timeout=SEND_TIMEOUT_S,
    )


class EventStream(EventSourceResponse):
    """An SSE response that is cut when its client reads too slowly.

    A client that stops reading blocks the response in a send (flow control), where no
    event of ours can reach it; the subscription then cancels the whole response, and
    the server closes the connection. The client resumes with ``Last-Event-ID``."""

    def __init__(self, rt: Runtime, sub: Subscription, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rt = rt
        self.sub = sub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with anyio.CancelScope() as cut:
                self.sub.on_overflow = cut.cancel
                await super().__call__(scope, receive, send)
            if cut.cancel_called:
                log.info(
                    "slow SSE client disconnected; it may resume",
                    job_id=self.sub.job_id,
                    buffer_events=self.rt.hub.buffer_size,
                )
        finally:
            self.sub.on_overflow = None
            self.rt.hub.unsubscribe(self.sub)
