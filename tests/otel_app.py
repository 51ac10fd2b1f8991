"""An application that configures OpenTelemetry (the SDK's in-memory exporter) for the
tracing test: each process records its finished spans and writes them, at exit, to
``$TIERLINE_TEST_SPANS_DIR/<pid>.json``."""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tierline import App

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)


def _dump() -> None:
    folder = os.environ.get("TIERLINE_TEST_SPANS_DIR")
    if not folder:
        return
    spans = [
        {
            "name": s.name,
            "trace_id": format(s.context.trace_id, "032x"),
            "span_id": format(s.context.span_id, "016x"),
            "parent_id": format(s.parent.span_id, "016x") if s.parent else None,
            "attributes": dict(s.attributes or {}),
        }
        for s in exporter.get_finished_spans()
    ]
    Path(folder, f"{os.getpid()}.json").write_text(json.dumps(spans))


atexit.register(_dump)

app = App("traced")


@app.job(max_attempts=1)
async def traced_child(n: int) -> int:
    return n


@app.job(max_attempts=1)
async def traced_parent(n: int) -> int:
    """Enqueues a follow-up job: its run joins the same trace."""
    await traced_child.enqueue(n=n + 1)
    return n
