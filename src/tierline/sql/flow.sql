-- Flow control: queue limits and pause (limits.py, claims.py), schedules (schedules.py),
-- bulk operations of the dashboard.

-- name: queue_declare
-- The code's declaration of a queue's limits; a field changed live keeps its live value.
INSERT INTO tierline.queues
    (name, max_running, rate_limit, rate_count, rate_period_s, partition_by, declared)
VALUES (%(name)s, %(max_running)s, %(rate_limit)s, %(rate_count)s, %(rate_period_s)s,
        %(partition_by)s, %(declared)s)
ON CONFLICT (name) DO UPDATE SET
    max_running = CASE WHEN 'max_running' = ANY (queues.overrides) THEN queues.max_running
                       ELSE excluded.max_running END,
    rate_limit = CASE WHEN 'rate_limit' = ANY (queues.overrides) THEN queues.rate_limit
                      ELSE excluded.rate_limit END,
    rate_count = CASE WHEN 'rate_limit' = ANY (queues.overrides) THEN queues.rate_count
                      ELSE excluded.rate_count END,
    rate_period_s = CASE WHEN 'rate_limit' = ANY (queues.overrides) THEN queues.rate_period_s
                         ELSE excluded.rate_period_s END,
    partition_by = CASE WHEN 'partition_by' = ANY (queues.overrides) THEN queues.partition_by
                        ELSE excluded.partition_by END,
    declared = excluded.declared, updated_at = now()
WHERE (queues.max_running, queues.rate_limit, queues.partition_by, queues.declared)
      IS DISTINCT FROM (excluded.max_running, excluded.rate_limit, excluded.partition_by,
                        excluded.declared);

-- name: queue_ensure
INSERT INTO tierline.queues (name) VALUES (%(name)s) ON CONFLICT (name) DO NOTHING;

-- name: queue_change
-- A live change; `reset` goes back to the code's declaration first. Workers are woken
-- for the queue (a resume or a raised limit takes effect at once).
WITH upd AS (
    UPDATE tierline.queues q SET
        max_running = CASE WHEN %(set_max_running)s THEN %(max_running)s::int
                           WHEN %(reset)s THEN (q.declared ->> 'max_running')::int
                           ELSE q.max_running END,
        rate_limit = CASE WHEN %(set_rate)s THEN %(rate_limit)s::text
                          WHEN %(reset)s THEN q.declared ->> 'rate_limit'
                          ELSE q.rate_limit END,
        rate_count = CASE WHEN %(set_rate)s THEN %(rate_count)s::int
                          WHEN %(reset)s THEN NULL ELSE q.rate_count END,
        rate_period_s = CASE WHEN %(set_rate)s THEN %(rate_period_s)s::float8
                             WHEN %(reset)s THEN NULL ELSE q.rate_period_s END,
        partition_by = CASE WHEN %(set_partition_by)s THEN %(partition_by)s::text
                            WHEN %(reset)s THEN q.declared ->> 'partition_by'
                            ELSE q.partition_by END,
        paused = coalesce(%(paused)s::bool, q.paused),
        paused_at = CASE WHEN %(paused)s::bool IS NULL THEN q.paused_at
                         WHEN %(paused)s::bool THEN coalesce(q.paused_at, now())
                         ELSE NULL END,
        overrides = ARRAY(SELECT DISTINCT f FROM unnest(
            CASE WHEN %(reset)s THEN '{}'::text[] ELSE q.overrides END
            || %(fields)s::text[]) AS f ORDER BY f),
        updated_at = now()
    WHERE q.name = %(name)s
    RETURNING q.*
), notified AS (
    SELECT pg_notify('tierline_jobs', name) FROM upd
)
SELECT upd.* FROM upd WHERE (SELECT count(*) FROM notified) >= 0;

-- name: queue_reset_rate
-- After a reset, the code's rate is parsed again by the caller (rate_limit is text).
UPDATE tierline.queues SET rate_count = %(rate_count)s, rate_period_s = %(rate_period_s)s
WHERE name = %(name)s RETURNING *;

-- name: queue_list
SELECT * FROM tierline.queues ORDER BY name;

-- name: queue_limited
-- The worker's routing table (claims.py), refreshed every second: which of its queues
-- need the limited claim. Correctness never depends on it: `claim` itself skips them.
SELECT name, paused, max_running, rate_count FROM tierline.queues
WHERE name = ANY (%(queues)s::text[])
  AND (paused OR max_running IS NOT NULL OR rate_count IS NOT NULL);

-- name: queue_lock
-- Claimers of one limited queue take turns: the count of running jobs and recent starts
-- that the next statement reads (a new snapshot, after this lock) includes every claim
-- committed before.
SELECT * FROM tierline.queues WHERE name = %(queue)s FOR UPDATE;

-- name: claim_limited
-- `claim` for one queue with limits, under `queue_lock`. Per partition (the value of
-- the argument `partition_by`, '' without one): running jobs and starts within the rate
-- window are counted, then the first waiting jobs in claim order are taken as far as
-- each partition's room allows. Partitioned queues look at the first `scan` waiting
-- jobs, so one busy partition does not hide the others. Times are taken once, after the
-- lock (`t`): in lock order, so the starts' window is exact whatever the claimers' clocks.
WITH t AS (
    SELECT clock_timestamp() AS now
), running AS (
    SELECT coalesce(j.args ->> %(partition_by)s::text, '') AS part, count(*) AS n
    FROM tierline.jobs j
    WHERE %(max_running)s::int IS NOT NULL AND j.state = 'running' AND j.queue = %(queue)s
    GROUP BY 1
), recent AS (
    SELECT s.part, count(*) AS n FROM tierline.queue_starts s, t
    WHERE %(rate_count)s::int IS NOT NULL AND s.queue = %(queue)s
      AND s.at > t.now - make_interval(secs => %(rate_period_s)s::float8)
    GROUP BY 1
), waiting AS (
    SELECT id, priority, run_at, coalesce(args ->> %(partition_by)s::text, '') AS part
    FROM tierline.jobs
    WHERE queue = %(queue)s AND state IN ('available', 'scheduled', 'retrying')
      AND run_at <= now() AND id <> ALL (%(skip)s::bigint[])
    ORDER BY priority DESC, run_at, id
    LIMIT %(scan)s
), ranked AS (
    SELECT w.*, row_number() OVER (PARTITION BY w.part
                                   ORDER BY w.priority DESC, w.run_at, w.id) AS rn
    FROM waiting w
), allowed AS (
    SELECT r.id FROM ranked r
    LEFT JOIN running ru ON ru.part = r.part
    LEFT JOIN recent re ON re.part = r.part
    WHERE (%(max_running)s::int IS NULL OR r.rn <= %(max_running)s::int - coalesce(ru.n, 0))
      AND (%(rate_count)s::int IS NULL OR r.rn <= %(rate_count)s::int - coalesce(re.n, 0))
    ORDER BY r.priority DESC, r.run_at, r.id
    LIMIT %(limit)s
), picked AS (
    SELECT j.id FROM tierline.jobs j
    WHERE j.id IN (SELECT id FROM allowed) AND j.state IN ('available', 'scheduled', 'retrying')
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE tierline.jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_owner = %(owner)s,
        lease_expires_at = t.now + make_interval(secs => %(lease_s)s),
        started_at = t.now, updated_at = t.now, event_seq = j.event_seq + 1
    FROM picked, t WHERE j.id = picked.id
    RETURNING j.*, t.now AS claimed_at
), starts AS (
    INSERT INTO tierline.queue_starts (queue, part, at)
    SELECT queue, coalesce(args ->> %(partition_by)s::text, ''), claimed_at FROM claimed
    WHERE %(rate_count)s::int IS NOT NULL
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

-- name: prune_queue_starts
-- Starts older than their queue's rate window count no more.
DELETE FROM tierline.queue_starts s
WHERE s.at < now() - make_interval(secs => coalesce(
    (SELECT q.rate_period_s FROM tierline.queues q WHERE q.name = s.queue), 0));

-- name: served_queues
-- The queues live worker replicas serve (from their registry rows), and by how many.
SELECT q.queue, count(*) AS workers
FROM tierline.replicas r
CROSS JOIN LATERAL jsonb_array_elements_text(r.stats -> 'queues') AS q(queue)
WHERE r.tier = 'worker' AND r.stopped_at IS NULL
  AND r.heartbeat_at + make_interval(secs => r.lease_s) > now()
  AND jsonb_typeof(r.stats -> 'queues') = 'array'
GROUP BY q.queue;

-- name: retry_failed
-- Bulk retry of a queue's failed jobs (the dashboard's button), at most `limit`.
WITH target AS (
    SELECT id FROM tierline.jobs
    WHERE queue = %(queue)s AND state = 'failed'
    ORDER BY id LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE tierline.jobs j
    SET state = 'available', run_at = now(), finished_at = NULL, cancel_requested_at = NULL,
        max_attempts = greatest(j.max_attempts, j.attempt + 1),
        event_seq = j.event_seq + 1, updated_at = now()
    FROM target t WHERE j.id = t.id
    RETURNING j.id, j.queue, j.kind, j.event_seq
), ev AS (
    INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data)
    SELECT id, event_seq, 'retrying', queue, kind, jsonb_build_object('by', 'api')
    FROM upd
), notified AS (
    SELECT pg_notify('tierline_jobs', %(queue)s) FROM (SELECT 1 FROM upd LIMIT 1) s
    UNION ALL
    SELECT pg_notify('tierline_events',
                     CASE WHEN count(*) > 300 THEN '*' ELSE string_agg(id::text, ',') END)
    FROM upd HAVING count(*) > 0
)
SELECT count(*) AS retried FROM upd WHERE (SELECT count(*) FROM notified) >= 0;

-- name: schedule_declare
-- The code's schedule; a changed spec keeps the progress (slots after it follow the new
-- spec).
INSERT INTO tierline.schedules (name, kind, spec, timezone, args, catch_up)
VALUES (%(name)s, %(kind)s, %(spec)s, %(timezone)s, %(args)s, %(catch_up)s)
ON CONFLICT (name) DO UPDATE SET
    kind = excluded.kind, spec = excluded.spec, timezone = excluded.timezone,
    args = excluded.args, catch_up = excluded.catch_up, declared_at = now()
WHERE (schedules.kind, schedules.spec, schedules.timezone, schedules.args, schedules.catch_up)
      IS DISTINCT FROM (excluded.kind, excluded.spec, excluded.timezone, excluded.args,
                        excluded.catch_up);

-- name: schedule_rows
-- The scheduler's tick (under the upkeep lock): the stored progress, and the time.
SELECT s.*, now() AS now FROM tierline.schedules s
WHERE s.name = ANY (%(names)s::text[])
FOR UPDATE SKIP LOCKED;

-- name: schedule_advance
UPDATE tierline.schedules
SET last_slot = %(last_slot)s, last_job_id = coalesce(%(last_job_id)s, last_job_id),
    updated_at = now()
WHERE name = %(name)s;

-- name: schedule_list
SELECT s.*, j.state AS last_job_state, now() AS now
FROM tierline.schedules s LEFT JOIN tierline.jobs j ON j.id = s.last_job_id
ORDER BY s.name;
