"""The demo application: the default ``TIERLINE_APP`` (``tierline.demo:app``)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from tierline.app import App
from tierline.context import JobContext

app = App("demo")


@app.job()
async def sleep(ctx: JobContext, seconds: float = 1.0) -> dict[str, float]:
    """I/O-bound: waits ``seconds``."""
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@app.job()
def cpu(iterations: int = 100_000) -> dict[str, Any]:
    """CPU-bound (runs in the thread pool): hashes ``iterations`` times."""
    digest = b"tierline"
    for _ in range(iterations):
        digest = hashlib.sha256(digest).digest()
    return {"iterations": iterations, "digest": digest.hex()[:16]}


@app.job()
async def echo(**args: Any) -> dict[str, Any]:
    """Returns its arguments."""
    return args


@app.job(max_attempts=3)
async def fail(message: str = "demo failure") -> None:
    """Always raises (retries, then ends failed)."""
    raise RuntimeError(message)


@app.job()
async def progress(ctx: JobContext, steps: int = 10, delay: float = 0.1) -> dict[str, int]:
    """Reports ``steps`` progress events, ``delay`` seconds apart."""
    for i in range(1, steps + 1):
        await asyncio.sleep(delay)
        ctx.progress(i / steps, f"step {i} of {steps}")
    return {"steps": steps}


@app.job()
async def noop() -> None:
    """Does nothing (benchmarks)."""
