-- Tierline's queries, by name. `tierline.queries` loads every `-- name: NAME` block.
-- Parameters use psycopg's %(name)s style. A data-modifying CTE always runs; a plain
-- SELECT CTE runs only when referenced, hence the `notified` CTEs are referenced below.
-- What each `pg_notify` sends on which channel, and why more than 300 job ids become '*':
-- the NOTIFY protocol in `tierline.notifications`.

-- name: enqueue
-- One job. With an idempotency key that exists already, or a unique key held by a job in
-- the key's states (unique.py), nothing is inserted and no row comes back: the caller
-- then reads the existing job with `job_by_key` (a repeated key is the rare case, and it
-- costs the second round trip it always did). A delay counts from the database's now(),
-- never from the enqueuing replica's clock; so does a unique key's period. The answer is
-- slim (what a new row adds to its input: its id and times; it is `scheduled` when due
-- after its creation): every column of it is client time on every enqueue.
-- The job's `enqueued` event is its row (seq 1, `job_event_pages`); the statement's
-- enqueue record (seq 0) gives it its place in the firehose (`firehose_after`, schema 7).
WITH ins AS (
    INSERT INTO tierline.jobs
        (queue, kind, args, state, priority, run_at, max_attempts, timeout_s, idempotency_key,
         trace_context, unique_key, unique_states, enqueued_run_at)
    SELECT %(queue)s, %(kind)s, %(args)s,
           CASE WHEN v.run_at > now() THEN 'scheduled' ELSE 'available' END,
           %(priority)s, v.run_at, %(max_attempts)s, %(timeout_s)s, %(idempotency_key)s,
           %(trace_context)s,
           CASE WHEN %(unique_period_s)s::float8 IS NULL THEN %(unique_key)s::text
                ELSE %(unique_key)s::text || ':'
                     || floor(extract(epoch FROM now()) / %(unique_period_s)s::float8)::bigint
           END,
           %(unique_states)s::text[], nullif(v.run_at, now())
    FROM (SELECT coalesce(%(run_at)s::timestamptz,
                          now() + make_interval(secs => %(delay_s)s::float8),
                          now()) AS run_at) v
    ON CONFLICT DO NOTHING  -- the idempotency key's index or the unique key's
    RETURNING id, queue, state, run_at, created_at
), ev AS (
    INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data)
    SELECT id, 0, 'enqueued', '', '', jsonb_build_object('jobs', jsonb_build_array(id))
    FROM ins
), notified AS (
    SELECT pg_notify('tierline_jobs', queue) FROM ins WHERE state = 'available'
    UNION ALL
    SELECT pg_notify('tierline_events', id::text) FROM ins
)
SELECT id, run_at, created_at FROM ins WHERE (SELECT count(*) FROM notified) >= 0;

-- name: job_by_key
-- The job that holds an enqueue's idempotency key, or its unique key in one of the key's
-- states (what made `enqueue` insert nothing). The period's number is taken from this
-- statement's now(): if a period ended in between, nothing is found and the caller's
-- next try inserts the job of the new period.
SELECT * FROM tierline.jobs j
WHERE (%(idempotency_key)s::text IS NOT NULL AND j.idempotency_key = %(idempotency_key)s)
   OR (%(unique_key)s::text IS NOT NULL AND j.state = ANY (j.unique_states)
       AND j.unique_key = CASE
           WHEN %(unique_period_s)s::float8 IS NULL THEN %(unique_key)s::text
           ELSE %(unique_key)s::text || ':'
                || floor(extract(epoch FROM now()) / %(unique_period_s)s::float8)::bigint
       END)
LIMIT 1;

-- name: enqueue_batch
-- Many jobs in one statement; one row per input row, in input order (`ord`): the job's
-- id and whether this statement created it. The answer is slim because reading it is
-- client time on every batch: `run_at` only where it is not the statement's now() (a
-- delayed or scheduled job), `now` on the first row only; the caller derives each new
-- job's state and times from them and reads repeated keys' jobs whole.
-- The batch arrives as one JSON array, turned into typed rows by one
-- `jsonb_to_recordset` (one parse on each side instead of one per value). Ids come from
-- the jobs' sequence in input order, so each inserted row joins back to its input; the
-- sequence's name is looked up once (an InitPlan), not once per row (2 ms per 1,000).
-- The jobs' `enqueued` events are their rows; the batch writes one enqueue record (seq
-- 0, keyed by its last job) that places them all in the firehose (schema 7).
-- Duplicate keys within one batch are removed by the caller; a key committed
-- concurrently leaves a row out and the caller retries the whole transaction. An
-- existing job is looked up by its key only for a row that was not inserted (an index
-- probe, never a scan of the table). Unique keys (unique.py) work the same way.
WITH u AS (
    SELECT e.ord, nextval((SELECT pg_get_serial_sequence('tierline.jobs', 'id'))) AS id,
           e.queue, e.kind, coalesce(e.args, '{}') AS args,
           coalesce(e.priority, 0) AS priority,
           coalesce(e.run_at, now() + make_interval(secs => e.delay_s), now()) AS run_at,
           e.max_attempts, e.timeout_s, e.idempotency_key, e.trace_context,
           CASE WHEN e.unique_period_s IS NULL THEN e.unique_key
                ELSE e.unique_key || ':'
                     || floor(extract(epoch FROM now()) / e.unique_period_s)::bigint
           END AS unique_key, e.unique_states
    FROM ROWS FROM (jsonb_to_recordset(%(batch)s::jsonb) AS (
        queue text, kind text, args jsonb, priority smallint, run_at timestamptz,
        delay_s float8, max_attempts int, timeout_s float8, idempotency_key text,
        trace_context jsonb, unique_key text, unique_period_s float8, unique_states text[]
    )) WITH ORDINALITY AS e(queue, kind, args, priority, run_at, delay_s, max_attempts,
                           timeout_s, idempotency_key, trace_context, unique_key,
                           unique_period_s, unique_states, ord)
), ins AS (
    INSERT INTO tierline.jobs
        (id, queue, kind, args, state, priority, run_at, max_attempts, timeout_s,
         idempotency_key, trace_context, unique_key, unique_states, enqueued_run_at)
    SELECT id, queue, kind, args,
           CASE WHEN run_at > now() THEN 'scheduled' ELSE 'available' END,
           priority, run_at, max_attempts, timeout_s, idempotency_key,
           trace_context, unique_key, unique_states, nullif(run_at, now())
    FROM u ORDER BY ord
    ON CONFLICT DO NOTHING  -- the idempotency key's index or the unique key's
    RETURNING id, queue, state, run_at
), ev AS (
    INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data)
    SELECT max(id), 0, 'enqueued', '', '', jsonb_build_object('jobs', jsonb_agg(id ORDER BY id))
    FROM ins HAVING count(*) > 0
), notified AS (
    SELECT pg_notify('tierline_jobs', q)
    FROM (SELECT DISTINCT queue AS q FROM ins WHERE state = 'available') s
    UNION ALL
    SELECT pg_notify('tierline_events',
                     CASE WHEN count(*) > 300 THEN '*' ELSE string_agg(id::text, ',') END)
    FROM ins HAVING count(*) > 0
)
SELECT coalesce(ins.id, e.id) AS id, ins.id IS NOT NULL AS created,
       nullif(ins.run_at, now()) AS run_at, CASE WHEN u.ord = 1 THEN now() END AS now
FROM u
LEFT JOIN ins ON ins.id = u.id
LEFT JOIN LATERAL (
    SELECT j.id FROM tierline.jobs j
    WHERE ins.id IS NULL
      AND ((u.idempotency_key IS NOT NULL AND j.idempotency_key = u.idempotency_key)
           OR (u.unique_key IS NOT NULL AND j.unique_key = u.unique_key
               AND j.state = ANY (j.unique_states)))
    LIMIT 1
) e ON true
WHERE (SELECT count(*) FROM notified) >= 0
ORDER BY u.ord;

-- name: claim_plan
-- Runs before `claim`, in its transaction, so that the claim always walks
-- `jobs_waiting_idx` in order and stops after `limit` rows. A queue's table changes faster
-- than autovacuum re-analyzes it: with statistics taken before a backlog arrived (or
-- became due), PostgreSQL expects a handful of due jobs and picks a bitmap scan that
-- reads and sorts the whole backlog on every claim instead: 290 ms instead of 0.4 ms
-- per claim at 55,000 due jobs, which halved the throughput of 8 worker replicas.
-- Local settings (`set_config(..., true)`, `SET LOCAL` as one statement, so that it can
-- be pipelined with the claim) end with the transaction; nothing else is planned under
-- them.
SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_seqscan', 'off', true);

-- name: claim
-- The River pattern: lock waiting, due jobs with SKIP LOCKED (so claimers never wait on
-- each other), then mark them running under a lease judged by the database clock.
-- One index walk per queue (`queue = ANY(...)` would make PostgreSQL sort the whole
-- backlog on every claim: 12 ms instead of 0.5 ms at 40,000 waiting jobs); each walk
-- stops after `limit` rows, and the best of them across queues are taken.
-- `skip`: jobs this replica must not start (usually none): those whose finished
-- attempt's thread still runs here (executors/thread.py), so a retry never runs beside it.
-- Queues with limits or paused (a row in `tierline.queues` that says so) are left to
-- `claim_limited` (claims.py): one primary-key probe per queue, whatever the worker's
-- routing table believes, so a pause or a new limit holds from its commit on.
WITH picked AS (
    SELECT j.id FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at FROM tierline.jobs
        WHERE queue = q.name AND state IN ('available', 'scheduled', 'retrying')
          AND run_at <= now() AND id <> ALL (%(skip)s::bigint[])
        ORDER BY priority DESC, run_at, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) j
    WHERE NOT EXISTS (
        SELECT 1 FROM tierline.queues c
        WHERE c.name = q.name
          AND (c.paused OR c.max_running IS NOT NULL OR c.rate_count IS NOT NULL))
    ORDER BY j.priority DESC, j.run_at, j.id
    LIMIT %(limit)s
), claimed AS (
    UPDATE tierline.jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_owner = %(owner)s,
        lease_expires_at = now() + make_interval(secs => %(lease_s)s),
        started_at = now(), updated_at = now(), event_seq = j.event_seq + 1
    FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.queue, j.kind, j.args, j.attempt, j.max_attempts, j.timeout_s,
              j.priority, j.run_at, j.created_at, j.event_seq, j.trace_context,
              now() AS claimed_at
), ev AS (
    INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data)
    SELECT id, event_seq, 'started', queue, kind,
           jsonb_build_object('attempt', attempt, 'replica', %(owner)s::text)
    FROM claimed
), notified AS (
    SELECT pg_notify('tierline_events',
                     CASE WHEN count(*) > 300 THEN '*' ELSE string_agg(id::text, ',') END)
    FROM claimed HAVING count(*) > 0
)
SELECT claimed.*, extract(epoch FROM claimed_at - greatest(run_at, created_at)) AS pickup_s
FROM claimed WHERE (SELECT count(*) FROM notified) >= 0;

-- name: record_events
-- Progress and log events of running jobs, written in batches. Each job's seq advances
-- under its row lock; a job past its event cap keeps only what fits.
WITH u AS (
    SELECT * FROM unnest(%(job_ids)s::bigint[], %(types)s::text[], %(datas)s::jsonb[])
        WITH ORDINALITY AS u(job_id, type, data, ord)
), c AS (
    SELECT job_id, count(*) AS n,
           (array_agg(data ORDER BY ord DESC) FILTER (WHERE type = 'progress'))[1] AS progress
    FROM u GROUP BY job_id
), lk AS (
    -- Rows locked in id order, like renew_leases and finish_batch: statements that lock
    -- many job rows in different orders deadlock (and wait deadlock_timeout to learn it).
    SELECT j.id FROM tierline.jobs j
    WHERE j.id IN (SELECT job_id FROM c) AND j.state = 'running'
      AND j.lease_owner = %(owner)s
    ORDER BY j.id
    FOR UPDATE
), upd AS (
    UPDATE tierline.jobs j
    SET event_seq = j.event_seq + c.n, progress = coalesce(c.progress, j.progress),
        updated_at = now()
    FROM c, lk
    WHERE j.id = c.job_id AND j.id = lk.id AND j.event_seq + c.n <= %(max_events)s
    RETURNING j.id, j.event_seq - c.n AS base, j.queue, j.kind
), ins AS (
    INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data)
    SELECT u.job_id,
           upd.base + row_number() OVER (PARTITION BY u.job_id ORDER BY u.ord),
           u.type, upd.queue, upd.kind, u.data
    FROM u JOIN upd ON upd.id = u.job_id
    RETURNING job_id
)
SELECT count(*) AS written,
       (SELECT pg_notify('tierline_events',
                         CASE WHEN count(DISTINCT job_id) > 300 THEN '*'
                              ELSE string_agg(DISTINCT job_id::text, ',') END)
        FROM ins) IS NULL AS notified
FROM ins;

-- name: finish_batch
-- Acknowledge finished attempts in one statement. Only jobs this replica still holds
-- (same owner, same attempt, still running) are changed; the rest were taken away.
WITH d AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(states)s::text[],
                         %(results)s::jsonb[], %(errors)s::jsonb[], %(delays)s::float8[])
        AS d(id, attempt, state, result, error, delay_s)
), lk AS (
    SELECT j.id FROM tierline.jobs j
    WHERE j.id IN (SELECT id FROM d) AND j.state = 'running' AND j.lease_owner = %(owner)s
    ORDER BY j.id
    FOR UPDATE  -- in id order: see record_events
), upd AS (
    UPDATE tierline.jobs j
    SET state = d.state, result = d.result, error = coalesce(d.error, j.error),
        run_at = CASE WHEN d.state = 'retrying'
                      THEN now() + make_interval(secs => d.delay_s) ELSE j.run_at END,
        finished_at = CASE WHEN d.state = 'retrying' THEN NULL ELSE now() END,
        lease_owner = NULL, lease_expires_at = NULL,
        event_seq = j.event_seq + 1, updated_at = now()
    FROM d, lk
    WHERE j.id = d.id AND j.id = lk.id AND j.attempt = d.attempt
    RETURNING j.id, j.queue, j.kind, j.state, j.event_seq, j.attempt, j.max_attempts,
              j.run_at, d.result, d.error,
              extract(epoch FROM now() - j.started_at) AS duration_s
), ev AS (
    INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data)
    SELECT id, event_seq, state, queue, kind,
           jsonb_strip_nulls(jsonb_build_object(
               'attempt', attempt, 'result', result, 'error', error,
               'run_at', CASE WHEN state = 'retrying' THEN run_at END))
    FROM upd
), notified AS (
    SELECT pg_notify('tierline_events',
                     CASE WHEN count(*) > 300 THEN '*' ELSE string_agg(id::text, ',') END)
    FROM upd HAVING count(*) > 0
)
SELECT id, queue, kind, state, attempt, duration_s FROM upd
WHERE (SELECT count(*) FROM notified) >= 0;

-- name: release
-- Hand running jobs back on shutdown: available again, the interrupted attempt not counted.
WITH upd AS (
    UPDATE tierline.jobs j
    SET state = CASE WHEN j.cancel_requested_at IS NULL THEN 'available' ELSE 'cancelled' END,
        finished_at = CASE WHEN j.cancel_requested_at IS NULL THEN NULL ELSE now() END,
        attempt = CASE WHEN j.cancel_requested_at IS NULL THEN j.attempt - 1 ELSE j.attempt END,
        run_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        event_seq = j.event_seq + 1, updated_at = now()
    WHERE j.id = ANY(%(ids)s::bigint[]) AND j.state = 'running' AND j.lease_owner = %(owner)s
    RETURNING j.id, j.queue, j.kind, j.state, j.event_seq
), ev AS (
    INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data)
    SELECT id, event_seq, CASE WHEN state = 'available' THEN 'retrying' ELSE state END,
           queue, kind, jsonb_build_object('reason', 'worker shut down')
    FROM upd
), notified AS (
    SELECT pg_notify('tierline_jobs', q)
    FROM (SELECT DISTINCT queue AS q FROM upd WHERE state = 'available') s
    UNION ALL
    SELECT pg_notify('tierline_events',
                     CASE WHEN count(*) > 300 THEN '*' ELSE string_agg(id::text, ',') END)
    FROM upd HAVING count(*) > 0
)
SELECT id, state FROM upd WHERE (SELECT count(*) FROM notified) >= 0;

-- name: renew_leases
-- Heartbeat of running jobs. Jobs not returned were taken away (their lease ran out);
-- cancel_requested tells the worker to stop them. Rows are locked in id order (see
-- record_events).
WITH lk AS (
    SELECT id FROM tierline.jobs
    WHERE id = ANY(%(ids)s::bigint[]) AND state = 'running' AND lease_owner = %(owner)s
    ORDER BY id
    FOR UPDATE
)
UPDATE tierline.jobs j
SET lease_expires_at = now() + make_interval(secs => %(lease_s)s)
FROM lk WHERE j.id = lk.id
RETURNING j.id, j.cancel_requested_at IS NOT NULL AS cancel_requested;

-- name: rescue_expired
-- Jobs whose lease ran out (their replica is gone): available again, or failed when that
-- was the last attempt, or cancelled when a cancel was pending.
WITH expired AS (
    SELECT id FROM tierline.jobs
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at LIMIT 1000
    FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE tierline.jobs j
    SET state = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                     WHEN j.attempt >= j.max_attempts THEN 'failed'
                     ELSE 'available' END,
        error = jsonb_build_object('type', 'LeaseExpired', 'attempt', j.attempt,
            'message', 'the replica running this attempt stopped heartbeating'),
        finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL
                             OR j.attempt >= j.max_attempts THEN now() END,
        run_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        event_seq = j.event_seq + 1, updated_at = now()
    FROM expired WHERE j.id = expired.id
    RETURNING j.id, j.queue, j.kind, j.state, j.event_seq, j.attempt, j.error
), ev AS (
    INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data)
    SELECT id, event_seq, CASE WHEN state = 'available' THEN 'retrying' ELSE state END,
           queue, kind, jsonb_build_object('attempt', attempt, 'error', error,
                                           'reason', 'lease expired')
    FROM upd
), notified AS (
    SELECT pg_notify('tierline_jobs', q)
    FROM (SELECT DISTINCT queue AS q FROM upd WHERE state = 'available') s
    UNION ALL
    SELECT pg_notify('tierline_events',
                     CASE WHEN count(*) > 300 THEN '*' ELSE string_agg(id::text, ',') END)
    FROM upd HAVING count(*) > 0
)
SELECT id, queue, state FROM upd WHERE (SELECT count(*) FROM notified) >= 0;

-- name: promote_due
-- Scheduled and retrying jobs whose time has come become available (claims take them
-- either way; this keeps the visible state and queue depth true).
WITH due AS (
    SELECT id FROM tierline.jobs
    WHERE state IN ('scheduled', 'retrying') AND run_at <= now()
    LIMIT 5000 FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE tierline.jobs j SET state = 'available', updated_at = now()
    FROM due WHERE j.id = due.id
    RETURNING j.queue
)
SELECT q AS queue, pg_notify('tierline_jobs', q) IS NULL AS notified
FROM (SELECT DISTINCT queue AS q FROM upd) s;

-- name: maintenance_lock
SELECT pg_try_advisory_xact_lock(7347123002) AS ok;

-- name: prune
-- Finished jobs past retention, and their events.
WITH old AS (
    SELECT id FROM tierline.jobs
    WHERE state IN ('succeeded', 'failed', 'cancelled')
      AND finished_at < now() - make_interval(secs => %(retention_s)s)
    LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), ev AS (
    DELETE FROM tierline.job_events e USING old WHERE e.job_id = old.id
), del AS (
    DELETE FROM tierline.jobs j USING old WHERE j.id = old.id RETURNING 1
)
SELECT count(*) AS pruned FROM del;

-- name: cancel
-- A waiting job is cancelled at once; a running one gets a cancel request its worker
-- sees through NOTIFY (and its next heartbeat at the latest).
WITH target AS (
    SELECT id, state FROM tierline.jobs WHERE id = %(id)s FOR UPDATE
), upd AS (
    UPDATE tierline.jobs j
    SET state = CASE WHEN t.state = 'running' THEN 'running' ELSE 'cancelled' END,
        finished_at = CASE WHEN t.state = 'running' THEN NULL ELSE now() END,
        cancel_requested_at = coalesce(j.cancel_requested_at, now()),
        event_seq = j.event_seq + CASE WHEN t.state = 'running' THEN 0 ELSE 1 END,
        updated_at = now()
    FROM target t
    WHERE j.id = t.id AND t.state IN ('scheduled', 'available', 'retrying', 'running')
    RETURNING j.*
), ev AS (
    INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data)
    SELECT id, event_seq, 'cancelled', queue, kind, jsonb_build_object('by', 'api')
    FROM upd WHERE state = 'cancelled'
), notified AS (
    SELECT pg_notify(CASE WHEN state = 'running' THEN 'tierline_cancel'
                          ELSE 'tierline_events' END, id::text)
    FROM upd
)
SELECT upd.*, true AS changed FROM upd WHERE (SELECT count(*) FROM notified) >= 0
UNION ALL
SELECT j.*, false AS changed FROM tierline.jobs j
WHERE j.id = %(id)s AND NOT EXISTS (SELECT 1 FROM upd);

-- name: retry
-- A finished job runs again (one more attempt than it has had).
WITH target AS (
    SELECT id, state FROM tierline.jobs WHERE id = %(id)s FOR UPDATE
), upd AS (
    UPDATE tierline.jobs j
    SET state = 'available', run_at = now(), finished_at = NULL, cancel_requested_at = NULL,
        max_attempts = greatest(j.max_attempts, j.attempt + 1),
        event_seq = j.event_seq + 1, updated_at = now()
    FROM target t
    WHERE j.id = t.id AND t.state IN ('succeeded', 'failed', 'cancelled')
    RETURNING j.*
), ev AS (
    INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data)
    SELECT id, event_seq, 'retrying', queue, kind, jsonb_build_object('by', 'api')
    FROM upd
), notified AS (
    SELECT pg_notify('tierline_jobs', queue) FROM upd
    UNION ALL
    SELECT pg_notify('tierline_events', id::text) FROM upd
)
SELECT upd.*, true AS changed FROM upd WHERE (SELECT count(*) FROM notified) >= 0
UNION ALL
SELECT j.*, false AS changed FROM tierline.jobs j
WHERE j.id = %(id)s AND NOT EXISTS (SELECT 1 FROM upd);

-- name: get_job
SELECT * FROM tierline.jobs WHERE id = %(id)s;

-- name: get_jobs
SELECT * FROM tierline.jobs WHERE id = ANY(%(ids)s::bigint[]);

-- name: list_jobs
-- Keyset pagination on id (newest first); every filter optional.
SELECT * FROM tierline.jobs
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(state)s::text IS NULL OR state = %(state)s)
  AND (%(kind)s::text IS NULL OR kind = %(kind)s)
  AND (%(before)s::bigint IS NULL OR id < %(before)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: job_events_after
-- One job's events after a seq (the event hub reads pages of many jobs at once, with the
-- queries in streaming.sql).
SELECT job_id, seq, type, queue, kind, data, at FROM tierline.job_stream
WHERE job_id = %(job_id)s AND seq > %(after)s
ORDER BY seq LIMIT %(limit)s;

-- name: firehose_after
-- Events in commit-safe order: only rows of transactions older than every transaction
-- still running, so nothing can later appear behind the cursor. A position is
-- (xid, id, sub): an event row's is (xid, id, 0); an enqueue record (seq 0, schema 7)
-- stands for the `enqueued` events of the jobs its statement created, at (xid, id, 1..n)
-- in the record's order, read from the jobs' rows. The page starts at the cursor's own
-- row (a record may be partly sent) and reads one row more than a page: every row after
-- the cursor's gives at least one event (a record goes with its last job when that is
-- pruned), so the page is short only at the end, which is how a replay knows it is.
WITH e AS (
    SELECT e.xid, e.id, e.job_id, e.seq, e.type, e.queue, e.kind, e.data, e.at
    FROM tierline.job_events e
    WHERE (e.xid, e.id) >= (%(xid)s::xid8, %(id)s::bigint)
      AND e.xid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY e.xid, e.id
    LIMIT %(limit)s::int + 1
)
SELECT p.xid::text AS xid, p.id, p.sub, p.job_id, p.seq, p.type, p.queue, p.kind, p.data,
       p.at
FROM (
    SELECT e.xid, e.id, 0::bigint AS sub, e.job_id, e.seq, e.type, e.queue, e.kind, e.data,
           e.at
    FROM e WHERE e.seq > 0
    UNION ALL
    SELECT e.xid, e.id, r.sub, q.job_id, q.seq, q.type, q.queue, q.kind, q.data, q.at
    FROM e
    CROSS JOIN LATERAL jsonb_array_elements_text(e.data -> 'jobs')
        WITH ORDINALITY AS r(job_id, sub)
    JOIN tierline.enqueued_events q ON q.job_id = r.job_id::bigint
    WHERE e.seq = 0
) p
WHERE (p.xid, p.id, p.sub) > (%(xid)s::xid8, %(id)s::bigint, %(sub)s::bigint)
ORDER BY p.xid, p.id, p.sub
LIMIT %(limit)s;

-- name: firehose_head
-- Where the firehose stands now: the position after the newest committed-safe event
-- (after every job of an enqueue record).
SELECT coalesce(max(xid), '0'::xid8)::text AS xid, coalesce(max(id), 0) AS id,
       coalesce(max(sub), 0) AS sub
FROM (SELECT e.xid, e.id,
             CASE WHEN e.seq = 0 THEN jsonb_array_length(e.data -> 'jobs') ELSE 0 END AS sub
      FROM tierline.job_events e
      WHERE e.xid < pg_snapshot_xmin(pg_current_snapshot())
      ORDER BY e.xid DESC, e.id DESC LIMIT 1) s;

-- name: queue_stats
-- Depth per queue and state, and the age of the oldest due waiting job.
SELECT queue, state, count(*) AS n,
       extract(epoch FROM now() - min(run_at) FILTER (
           WHERE state IN ('available', 'scheduled', 'retrying') AND run_at <= now()))
           AS oldest_s
FROM tierline.jobs GROUP BY queue, state;

-- name: queue_throughput
-- Jobs finished per queue over the last 1, 5 and 15 minutes.
SELECT queue,
       count(*) FILTER (WHERE finished_at > now() - interval '1 minute') AS m1,
       count(*) FILTER (WHERE finished_at > now() - interval '5 minutes') AS m5,
       count(*) AS m15,
       count(*) FILTER (WHERE state = 'failed') AS failed_m15
FROM tierline.jobs
WHERE state IN ('succeeded', 'failed', 'cancelled')
  AND finished_at > now() - interval '15 minutes'
GROUP BY queue;

-- name: stats_get
SELECT value, extract(epoch FROM now() - updated_at) AS age_s
FROM tierline.stats WHERE key = %(key)s;

-- name: stats_put
INSERT INTO tierline.stats (key, value, updated_at) VALUES (%(key)s, %(value)s, now())
ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now();

-- name: stats_lock
SELECT pg_try_advisory_xact_lock(7347123003) AS ok;
