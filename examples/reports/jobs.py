"""The worker side of the example: building a report.

``build_report`` computes its rows one step at a time, reporting progress (which the page
follows over the job's event stream), then writes the result into the application's own
table through ``ctx.connection()``, a connection of the worker's budgeted pool.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from tierline import App, JobContext
from tierline.demo import app as demo

app = App("reports", migrations=Path(__file__).with_name("migrations"))
app.include(demo)  # the demo kinds (echo, progress, fail...) stay available


@app.job(queue="default", max_attempts=3, timeout=120, uses_db=True)
async def build_report(ctx: JobContext, report_id: int, rows: int = 20, delay: float = 0.1) -> int:
    """Computes ``rows`` rows (``delay`` seconds each), then stores the total."""
    total = 0
    for i in range(1, rows + 1):
        await asyncio.sleep(delay)
        digest = hashlib.sha256(f"{report_id}:{i}".encode()).digest()
        total += int.from_bytes(digest[:2], "big")
        ctx.progress(i / rows, f"row {i} of {rows}")
    async with ctx.connection() as conn:
        await conn.execute(
            "UPDATE public.reports SET status = 'done', total = %s, finished_at = now() "
            "WHERE id = %s",
            (total, report_id),
        )
    return total
