"""``/v1/jobs``: enqueue (one or a batch), read, list, cancel, retry."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from tierline import metrics
from tierline.jobs import KIND_PATTERN, QUEUE_PATTERN, Job, JobRequest, State
from tierline.web.errors import COMMON, ApiError, ErrorResponse
from tierline.web.runtime import Runtime, scoped

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=COMMON)
JobId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Job id.")]


class BatchRequest(BaseModel):
    jobs: list[JobRequest] = Field(min_length=1, description="Jobs, enqueued atomically.")


class BatchItem(Job):
    created: bool


class BatchResponse(BaseModel):
    jobs: list[BatchItem]


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


def _job_json(job: Job, **extra: Any) -> dict[str, Any]:
    return {**job.model_dump(mode="json"), **extra}


@router.post(
    "",
    status_code=202,
    response_model=Job,
    responses={200: {"model": Job, "description": "Existing job (repeated idempotency key)"}},
)
async def enqueue(request: JobRequest, rt: Runtime = scoped("enqueue")) -> JSONResponse:
    """Enqueue a job: 202 Accepted, or 200 with the existing job for a repeated key."""
    job, created = await rt.require_queue().enqueue(request)
    return JSONResponse(
        _job_json(job),
        status_code=202 if created else 200,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


@router.post(
    "/batch",
    status_code=202,
    response_model=BatchResponse,
    responses={200: {"model": BatchResponse, "description": "Nothing new: every key was known"}},
)
async def enqueue_batch(
    body: BatchRequest = Body(...), rt: Runtime = scoped("enqueue")
) -> JSONResponse:
    """Enqueue many jobs in one transaction (all or none)."""
    if len(body.jobs) > rt.settings.max_batch_size:
        raise ApiError(
            413, "payload_too_large", f"a batch holds at most {rt.settings.max_batch_size} jobs"
        )
    results = await rt.require_queue().enqueue_batch(body.jobs)
    created = any(c for _, c in results)
    return JSONResponse(
        {"jobs": [_job_json(j, created=c) for j, c in results]}, status_code=202 if created else 200
    )


@router.get("", response_model=JobList)
async def list_jobs(
    queue: Annotated[str | None, Query(pattern=QUEUE_PATTERN)] = None,
    state: State | None = None,
    kind: Annotated[str | None, Query(pattern=KIND_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[
        str | None,
        Query(pattern=r"^[0-9]{1,19}$", description="`next_cursor` of the previous page."),
    ] = None,
    rt: Runtime = scoped("read"),
) -> JobList:
    """Jobs, newest first, filtered by queue, state and kind; keyset-paginated."""
    before = int(cursor) if cursor else None
    jobs = await rt.require_queue().list(
        queue=queue, state=state.value if state else None, kind=kind, before=before, limit=limit
    )
    nxt = str(jobs[-1].id) if len(jobs) == limit else None
    return JobList(jobs=jobs, next_cursor=nxt)


@router.get("/{job_id}", response_model=Job, responses={404: {"model": ErrorResponse}})
async def get_job(job_id: JobId, rt: Runtime = scoped("read")) -> Job:
    return await rt.require_queue().get(job_id)


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
async def cancel_job(job_id: JobId, rt: Runtime = scoped("admin")) -> Job:
    """Cancel a waiting job now; ask a running one to stop (it ends `cancelled`)."""
    job = await rt.require_queue().cancel(job_id)
    if job.state == State.cancelled:
        metrics.JOBS_FINISHED.labels(job.queue, "cancelled").inc()
    return job


@router.post(
    "/{job_id}/retry",
    response_model=Job,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
async def retry_job(job_id: JobId, rt: Runtime = scoped("admin")) -> Job:
    """Run a finished job again."""
    return await rt.require_queue().retry(job_id)
