"""OpenTelemetry traces, optional (``pip install 'tierline[otel]'``).

Tierline never configures OpenTelemetry; it uses the tracer provider the application set
up (``opentelemetry-instrument tierline web``, or a ``TracerProvider`` set when the
application's module is imported). Then:

- the web tier makes a span per HTTP request, the application's routes included
  (FastAPI's native telemetry, or OpenTelemetry's ASGI instrumentation for other apps);
- every enqueue, over HTTP or from Python, inside a request or a job, stores the current
  W3C trace context (``traceparent``/``tracestate``) with the job;
- the worker's span of each attempt (``tierline.job``, attributes queue, kind, attempt,
  outcome) is a child of it, so a follow-up job enqueued by a handler joins the trace too;
- claims and acknowledgement batches are spans of their own (``tierline.claim``,
  ``tierline.ack``).

Without the package, or with no provider configured (the API's default), ``active()``
is False after one check and every function here returns at once: nothing else runs on
the hot paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

_tracer: Any = None
_checked = False


def setup() -> bool:
    """Look (again) for a configured tracer provider; True when tracing is on."""
    global _tracer, _checked
    _checked, _tracer = True, None
    try:
        from opentelemetry import trace
    except ImportError:
        return False
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return False  # nobody configured the SDK: spans would all be no-ops
    from tierline import __version__

    _tracer = trace.get_tracer("tierline", __version__)
    return True


def active() -> bool:
    if not _checked:
        setup()
    return _tracer is not None


def carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers, to store with a job; None without one."""
    if not active():
        return None
    from opentelemetry import propagate

    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers or None


def span(
    name: str, attributes: Mapping[str, Any] | None = None, parent: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """A span (``None`` when tracing is off); ``parent``: a stored trace context."""
    if not active():
        return _NO_SPAN
    return _span(name, attributes, parent)


_NO_SPAN = contextlib.nullcontext()


@contextlib.contextmanager
def _span(
    name: str, attributes: Mapping[str, Any] | None, parent: Mapping[str, str] | None
) -> Iterator[Any]:
    context = None
    if parent:
        from opentelemetry import propagate

        context = propagate.extract(dict(parent))
    with _tracer.start_as_current_span(name, context=context, attributes=attributes) as s:
        yield s


def set_attributes(current: Any, **attributes: Any) -> None:
    if current is not None:
        current.set_attributes(attributes)


def instrument(app: Any) -> Any:
    """``app`` with a span per HTTP request, when tracing is on: FastAPI applications
    make their own (FastAPI's native telemetry), any other ASGI app is wrapped in
    OpenTelemetry's ASGI instrumentation; never both, so a request has one server span."""
    if not active() or hasattr(app, "_native_telemetry"):
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app, excluded_urls="healthz,readyz,metrics")
