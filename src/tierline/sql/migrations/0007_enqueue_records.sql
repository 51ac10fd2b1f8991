-- Tierline schema, version 7: a job's `enqueued` event is its own row.
--
-- Until version 6 every enqueue wrote a second row per job, its `enqueued` event, with
-- two index entries: 44 % of an enqueue's WAL and a fifth of a batch's time. What that
-- event says (queue, kind, state and due time at enqueue, priority, the time) is in the
-- job's row, so the job's stream now reads its seq 1 from `tierline.jobs`
-- (`job_event_pages`, `jobs_events_after`). What only the event row gave is the job's
-- place in the firehose, ordered by the writing transaction (`(xid, id)`): an enqueue
-- statement now writes one row for all the jobs it created, an *enqueue record*
-- (`seq` 0, `type` 'enqueued', `data` {"jobs": [ids]}, `job_id` its last job), which
-- the firehose expands into one `enqueued` event per job (`firehose_after`). A batch
-- of 1,000 jobs writes one row instead of 1,000.
--
-- Jobs enqueued before this version keep their stored `enqueued` row (seq 1), which
-- the streams read as before; theirs is never synthesized twice.

-- The due time the job was enqueued with, when it was not the enqueue's own time (a
-- delayed, scheduled or back-dated job): `run_at` changes on retries, the `enqueued`
-- event must not. NULL (no bytes) for a job due at once. Nullable without a default:
-- adding it rewrites nothing.
ALTER TABLE tierline.jobs ADD COLUMN enqueued_run_at timestamptz;

-- Each job's `enqueued` event, read from its row: what the enqueue statement stored
-- before this version (the state and due time it was enqueued with, its priority, which
-- never changes, and the enqueue's time).
CREATE VIEW tierline.enqueued_events AS
SELECT j.id AS job_id, 1 AS seq, 'enqueued'::text AS type, j.queue, j.kind,
       jsonb_build_object(
           'state', CASE WHEN j.enqueued_run_at > j.created_at THEN 'scheduled'
                         ELSE 'available' END,
           'run_at', coalesce(j.enqueued_run_at, j.created_at),
           'priority', j.priority) AS data,
       j.created_at AS at
FROM tierline.jobs j;

-- Every job's stream, in seq order: its stored events (seq 1 too for jobs enqueued
-- before this version) and, for the others, its `enqueued` event from its row. Queries
-- filter by job_id and seq; PostgreSQL applies both to each branch (an index probe
-- each), and `ORDER BY seq LIMIT n` merges them.
CREATE VIEW tierline.job_stream AS
SELECT e.job_id, e.seq, e.type, e.queue, e.kind, e.data, e.at
FROM tierline.job_events e
WHERE e.seq > 0
UNION ALL
SELECT q.job_id, q.seq, q.type, q.queue, q.kind, q.data, q.at
FROM tierline.enqueued_events q
WHERE NOT EXISTS (
    SELECT 1 FROM tierline.job_events e WHERE e.job_id = q.job_id AND e.seq = 1);
