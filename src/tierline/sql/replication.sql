-- The read replica (`tierline.read_routing`): where the primary's WAL stands, how far the
-- replica has replayed it. Positions are bytes since 0/0, compared as numbers; times are
-- the primary's clock only, so no host's clock enters the lag.

-- name: primary_wal_position
SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint AS lsn,
       extract(epoch FROM clock_timestamp())::float8 AS t;

-- name: replica_replay_position
-- NULL when the server is no replica (it reads what it writes: no lag).
SELECT CASE WHEN pg_is_in_recovery()
            THEN (coalesce(pg_last_wal_replay_lsn(), '0/0'::pg_lsn) - '0/0'::pg_lsn)::bigint
       END AS lsn;

-- name: replica_server
-- The read replica's side of `GET /v1/cluster`.
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS superuser_reserved,
       (SELECT count(*)::int FROM pg_stat_activity WHERE backend_type = 'client backend')
           AS connections,
       pg_is_in_recovery() AS in_recovery;

-- name: stats_get_as_of
-- `stats_get` for either server: the snapshot's age as of the data read (on a replica,
-- the primary's commit time of the last transaction it replayed), so replay lag does
-- not count as age and the replica's clock does not enter it.
SELECT value,
       extract(epoch FROM CASE WHEN pg_is_in_recovery()
                               THEN coalesce(pg_last_xact_replay_timestamp(), now())
                               ELSE now() END - updated_at) AS age_s
FROM tierline.stats WHERE key = %(key)s;
