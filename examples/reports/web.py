"""The web side of the example: the application's own HTTP API and page, served by
Tierline's web tier (``TIERLINE_WEB_APP=examples.reports.web:api``).

``POST /reports`` writes the report's row and enqueues its job in one transaction, on a
connection of the web tier's budgeted pool: either both exist or neither does. The page
(``GET /``) follows the job's events from Tierline's stream under ``/tierline``.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from psycopg import AsyncConnection
from pydantic import BaseModel, Field

from examples.reports.jobs import build_report
from tierline.web import connection, read_connection

api = FastAPI(title="Reports (a Tierline example)")
Conn = Annotated[AsyncConnection[Any], Depends(connection)]
ReadConn = Annotated[AsyncConnection[Any], Depends(read_connection)]
api.mount("/static-reports", StaticFiles(packages=[("examples.reports", "static")]), name="static")


class NewReport(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    rows: int = Field(20, ge=1, le=1000)


class Report(BaseModel):
    id: int
    title: str
    rows: int
    status: str
    job_id: int | None
    total: int | None


@api.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    html = resources.files("examples.reports").joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(html)


@api.post("/reports", status_code=201)
async def create_report(body: NewReport, conn: Conn) -> Report:
    """The row and its job, in one transaction."""
    async with conn.transaction():
        cur = await conn.execute(
            "INSERT INTO public.reports (title, rows) VALUES (%s, %s) RETURNING id",
            (body.title, body.rows),
        )
        row = await cur.fetchone()
        assert row is not None
        job = await build_report.using(connection=conn).enqueue(report_id=row["id"], rows=body.rows)
        cur = await conn.execute(
            "UPDATE public.reports SET job_id = %s WHERE id = %s RETURNING *", (job.id, row["id"])
        )
        report = await cur.fetchone()
    return Report.model_validate(report)


@api.get("/reports")
async def list_reports(conn: ReadConn) -> list[Report]:
    cur = await conn.execute("SELECT * FROM public.reports ORDER BY id DESC LIMIT 20")
    return [Report.model_validate(r) for r in await cur.fetchall()]


@api.get("/reports/{report_id}")
async def get_report(report_id: int, conn: ReadConn) -> Report:
    cur = await conn.execute("SELECT * FROM public.reports WHERE id = %s", (report_id,))
    row = await cur.fetchone()
    if row is None:
        raise HTTPException(404, f"report {report_id} not found")
    return Report.model_validate(row)
