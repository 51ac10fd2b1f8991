-- The replica registry and the connection budget. Claims are made inside a transaction
-- holding the budget's transaction-scoped advisory lock, so two replicas never both see
-- the same free connections (and no session state is needed: safe behind PgBouncer).

-- name: budget_lock
SELECT pg_advisory_xact_lock(7347123001);

-- name: server_limits
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS superuser_reserved,
       coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::int
           AS reserved;

-- name: live_claims
-- Connections claimed by live replicas other than this one.
SELECT coalesce(sum(claimed), 0)::int AS claimed, count(*)::int AS replicas
FROM tierline.replicas
WHERE id <> %(id)s AND stopped_at IS NULL
  AND heartbeat_at + make_interval(secs => lease_s) > now();

-- name: live_read_claims
-- Connections on the read replica claimed by live replicas other than this one (the
-- replica's budget, under the same lock as the primary's).
SELECT coalesce(sum(read_claimed), 0)::int AS claimed, count(*)::int AS replicas
FROM tierline.replicas
WHERE id <> %(id)s AND stopped_at IS NULL AND read_claimed > 0
  AND heartbeat_at + make_interval(secs => lease_s) > now();

-- name: upsert_replica
INSERT INTO tierline.replicas
    (id, tier, host, pid, version, lease_s, requested_pool, pool_max, claimed, ready, reason,
     stats, read_requested_pool, read_pool_max, read_claimed)
VALUES (%(id)s, %(tier)s, %(host)s, %(pid)s, %(version)s, %(lease_s)s, %(requested_pool)s,
        %(pool_max)s, %(claimed)s, %(ready)s, %(reason)s, %(stats)s,
        %(read_requested_pool)s, %(read_pool_max)s, %(read_claimed)s)
ON CONFLICT (id) DO UPDATE
SET pool_max = excluded.pool_max, claimed = excluded.claimed, ready = excluded.ready,
    reason = excluded.reason, heartbeat_at = now(), stopped_at = NULL,
    requested_pool = excluded.requested_pool,
    read_requested_pool = excluded.read_requested_pool,
    read_pool_max = excluded.read_pool_max, read_claimed = excluded.read_claimed;

-- name: claim_read
-- A read pool granted after the replica's first claim (the read replica was down or its
-- budget full then).
UPDATE tierline.replicas
SET read_requested_pool = %(read_requested_pool)s, read_pool_max = %(read_pool_max)s,
    read_claimed = %(read_claimed)s
WHERE id = %(id)s AND stopped_at IS NULL;

-- name: heartbeat
-- Returns nothing when this replica's lease had already run out: its claim is void and
-- must be made again.
UPDATE tierline.replicas
SET heartbeat_at = now(), stats = %(stats)s, ready = %(ready)s, reason = %(reason)s
WHERE id = %(id)s AND stopped_at IS NULL
  AND heartbeat_at + make_interval(secs => lease_s) > now()
RETURNING id;

-- name: stop_replica
UPDATE tierline.replicas SET stopped_at = now(), claimed = 0, read_claimed = 0,
    ready = false, reason = 'stopped'
WHERE id = %(id)s;

-- name: list_replicas
-- Live replicas and those that stopped or died recently (kept an hour for the dashboard).
-- Judged as of the snapshot read: on the primary that is now(); on a read replica, the
-- primary's commit time of the last transaction it replayed (the primary's clock), so a
-- lagging replica does not make heartbeats look older than they are.
WITH as_of AS (
    SELECT CASE WHEN pg_is_in_recovery()
                THEN coalesce(pg_last_xact_replay_timestamp(), now()) ELSE now() END AS t
)
SELECT id, tier, host, pid, version, started_at, heartbeat_at, lease_s, requested_pool,
       pool_max, claimed, ready, reason, stopped_at, stats, read_requested_pool,
       read_pool_max, read_claimed,
       stopped_at IS NULL AND heartbeat_at + make_interval(secs => lease_s) > as_of.t
           AS alive,
       extract(epoch FROM as_of.t - heartbeat_at) AS heartbeat_age_s
FROM tierline.replicas, as_of
WHERE coalesce(stopped_at, heartbeat_at) > as_of.t - interval '1 hour'
ORDER BY tier, started_at;

-- name: prune_replicas
DELETE FROM tierline.replicas
WHERE coalesce(stopped_at, heartbeat_at) < now() - interval '1 day';

-- name: server_connections
SELECT count(*)::int AS connections FROM pg_stat_activity WHERE backend_type = 'client backend';
