-- Least-privilege roles of the two tiers: `tierline migrate --create-roles`.
--
-- Not a versioned migration, on purpose: roles are cluster-wide objects whose names and
-- passwords are deployment settings, while grants and row-level security policies
-- belong to one database and must be re-applied whenever a migration adds a table or a
-- column. So `--create-roles` runs after the migrations, every time, in one transaction:
-- revoke what the roles had here, grant exactly what each tier's queries need.
--
-- Placeholders in braces are filled by tierline.roles with psycopg.sql objects (never
-- string formatting): `role` is the role's identifier, names starting with `p_` are
-- policy identifiers (`<role>_<rest>`), `database`, `password` and `retention` are given.
-- Row-level security narrows only the two roles: a permissive allow-all policy keeps
-- every other role's access governed by its table privileges alone, and the owner
-- (the migrating user) bypasses RLS anyway.

-- name: roles_lookup
SELECT rolname, rolsuper, rolbypassrls, rolcanlogin, rolcreaterole, rolcreatedb
FROM pg_roles WHERE rolname = %(name)s;

-- name: roles_create
CREATE ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD {password};

-- name: roles_set_password
ALTER ROLE {role} WITH PASSWORD {password};

-- name: roles_revoke
-- Start from nothing in this database, so that a narrower grant list takes effect on a
-- re-run (revoking table privileges revokes the column privileges too).
REVOKE ALL ON ALL TABLES IN SCHEMA tierline FROM {role};
REVOKE ALL ON ALL SEQUENCES IN SCHEMA tierline FROM {role};
REVOKE ALL ON SCHEMA tierline FROM {role};

-- name: roles_grant_common
-- Both tiers: the schema check at start-up, the replica registry and connection budget
-- (registry.sql), shared statistics, enqueueing (workers enqueue follow-up jobs too) and
-- reading jobs and events. Advisory locks, pg_notify, LISTEN, current_setting and
-- pg_stat_activity are open to every role by default and need no grant. No CREATE on
-- the schema: neither role can change it.
GRANT CONNECT ON DATABASE {database} TO {role};
GRANT USAGE ON SCHEMA tierline TO {role};
GRANT SELECT ON tierline.migrations TO {role};
GRANT SELECT ON tierline.jobs, tierline.job_events, tierline.replicas, tierline.stats,
                tierline.enqueued_events, tierline.job_stream
    TO {role};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA tierline TO {role};
GRANT INSERT (id, queue, kind, args, state, priority, run_at, max_attempts, timeout_s,
              idempotency_key, trace_context, unique_key, unique_states, enqueued_run_at)
    ON tierline.jobs TO {role};
-- Queue limits and pause: workers store the code's declarations, the web tier changes
-- them live (PATCH /v1/queues/NAME); schedules are the workers' (limits.py, schedules.py).
GRANT SELECT ON tierline.queues, tierline.schedules, tierline.queue_starts TO {role};
GRANT INSERT, UPDATE ON tierline.queues TO {role};
GRANT INSERT (job_id, seq, type, queue, kind, data) ON tierline.job_events TO {role};
GRANT INSERT (id, tier, host, pid, version, lease_s, requested_pool, pool_max, claimed,
              ready, reason, stats, read_requested_pool, read_pool_max, read_claimed)
    ON tierline.replicas TO {role};
GRANT UPDATE (heartbeat_at, stopped_at, requested_pool, pool_max, claimed, ready, reason,
              stats, read_requested_pool, read_pool_max, read_claimed)
    ON tierline.replicas TO {role};
GRANT INSERT (key, value, updated_at), UPDATE (value, updated_at) ON tierline.stats
    TO {role};

-- name: roles_grant_web
-- Cancel and retry change only these columns. Without attempt, lease_owner,
-- lease_expires_at and started_at the claim query is refused: the web tier cannot run
-- jobs, and the policy below keeps it from marking any job running.
GRANT UPDATE (state, run_at, finished_at, cancel_requested_at, max_attempts, event_seq,
              updated_at)
    ON tierline.jobs TO {role};

-- name: roles_grant_worker
-- Claim, progress, finish, release, lease renewal, rescue and promotion; pruning deletes
-- finished jobs, their events and long-dead registry rows (policies below say which).
GRANT UPDATE (state, attempt, run_at, lease_owner, lease_expires_at, started_at,
              finished_at, event_seq, progress, result, error, updated_at)
    ON tierline.jobs TO {role};
GRANT DELETE ON tierline.jobs, tierline.job_events, tierline.replicas TO {role};
GRANT INSERT, DELETE ON tierline.queue_starts TO {role};
GRANT INSERT, UPDATE ON tierline.schedules TO {role};

-- name: roles_rls
-- Idempotent: the allow-all policies are replaced in the same transaction.
ALTER TABLE tierline.jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE tierline.job_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE tierline.replicas ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tierline_allow_all ON tierline.jobs;
DROP POLICY IF EXISTS tierline_allow_all ON tierline.job_events;
DROP POLICY IF EXISTS tierline_allow_all ON tierline.replicas;
CREATE POLICY tierline_allow_all ON tierline.jobs USING (true) WITH CHECK (true);
CREATE POLICY tierline_allow_all ON tierline.job_events USING (true) WITH CHECK (true);
CREATE POLICY tierline_allow_all ON tierline.replicas USING (true) WITH CHECK (true);

-- name: roles_policies_web
-- New jobs start waiting. An update may leave a job available (retry) or cancelled, or
-- running only when it has a lease owner, i.e. a cancel request on a job a worker runs:
-- the web role cannot set lease_owner, so it can never make a job run.
-- It writes registry rows of web replicas only.
DROP POLICY IF EXISTS {p_new_jobs_wait} ON tierline.jobs;
CREATE POLICY {p_new_jobs_wait} ON tierline.jobs AS RESTRICTIVE FOR INSERT TO {role}
    WITH CHECK (state IN ('scheduled', 'available'));
DROP POLICY IF EXISTS {p_no_running} ON tierline.jobs;
CREATE POLICY {p_no_running} ON tierline.jobs AS RESTRICTIVE FOR UPDATE TO {role}
    WITH CHECK (state IN ('available', 'cancelled')
                OR (state = 'running' AND lease_owner IS NOT NULL));
DROP POLICY IF EXISTS {p_own_tier_insert} ON tierline.replicas;
CREATE POLICY {p_own_tier_insert} ON tierline.replicas AS RESTRICTIVE FOR INSERT TO {role}
    WITH CHECK (tier = 'web');
DROP POLICY IF EXISTS {p_own_tier_update} ON tierline.replicas;
CREATE POLICY {p_own_tier_update} ON tierline.replicas AS RESTRICTIVE FOR UPDATE TO {role}
    USING (tier = 'web') WITH CHECK (tier = 'web');

-- name: roles_policies_worker
-- Pruning is the only deletion: finished jobs past the retention floor (the retention in
-- force when the roles were granted) and the events of such jobs; registry rows only of
-- replicas that stopped or whose lease ran out, so no live claim on the budget can be
-- erased. Rows outside a DELETE policy are skipped silently, never an error: a worker
-- with a shorter retention than the floor prunes later, never earlier.
DROP POLICY IF EXISTS {p_new_jobs_wait} ON tierline.jobs;
CREATE POLICY {p_new_jobs_wait} ON tierline.jobs AS RESTRICTIVE FOR INSERT TO {role}
    WITH CHECK (state IN ('scheduled', 'available'));
DROP POLICY IF EXISTS {p_prune_jobs} ON tierline.jobs;
CREATE POLICY {p_prune_jobs} ON tierline.jobs AS RESTRICTIVE FOR DELETE TO {role}
    USING (state IN ('succeeded', 'failed', 'cancelled')
           AND finished_at < now() - make_interval(secs => {retention}));
DROP POLICY IF EXISTS {p_prune_events} ON tierline.job_events;
CREATE POLICY {p_prune_events} ON tierline.job_events AS RESTRICTIVE FOR DELETE TO {role}
    USING (EXISTS (
        SELECT 1 FROM tierline.jobs j
        WHERE j.id = job_events.job_id AND j.state IN ('succeeded', 'failed', 'cancelled')
          AND j.finished_at < now() - make_interval(secs => {retention})));
DROP POLICY IF EXISTS {p_own_tier_insert} ON tierline.replicas;
CREATE POLICY {p_own_tier_insert} ON tierline.replicas AS RESTRICTIVE FOR INSERT TO {role}
    WITH CHECK (tier = 'worker');
DROP POLICY IF EXISTS {p_own_tier_update} ON tierline.replicas;
CREATE POLICY {p_own_tier_update} ON tierline.replicas AS RESTRICTIVE FOR UPDATE TO {role}
    USING (tier = 'worker') WITH CHECK (tier = 'worker');
DROP POLICY IF EXISTS {p_prune_replicas} ON tierline.replicas;
CREATE POLICY {p_prune_replicas} ON tierline.replicas AS RESTRICTIVE FOR DELETE TO {role}
    USING (stopped_at IS NOT NULL OR heartbeat_at + make_interval(secs => lease_s) < now());
