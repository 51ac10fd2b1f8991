-- The application's own table, beside Tierline's schema: one row per requested report.
-- Applied by `tierline migrate` (and `tierline up`) after Tierline's migrations.
CREATE TABLE public.reports (
    id          bigserial   PRIMARY KEY,
    title       text        NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    rows        integer     NOT NULL CHECK (rows BETWEEN 1 AND 1000),
    status      text        NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'done')),
    job_id      bigint,
    total       bigint,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX reports_created_idx ON public.reports (created_at DESC);
