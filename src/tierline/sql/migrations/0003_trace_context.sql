-- The W3C trace context (traceparent, tracestate) of whoever enqueued the job, captured
-- only when OpenTelemetry is configured; the worker's span of each attempt is its child,
-- so one trace runs from the request that enqueued a job through the job's runs.
-- Nullable without a default: adding it rewrites nothing.
ALTER TABLE tierline.jobs ADD COLUMN trace_context jsonb;
