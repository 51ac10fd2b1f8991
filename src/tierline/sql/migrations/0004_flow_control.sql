-- Tierline schema, version 4: flow control (queue limits and pause), schedules, unique jobs.

-- One row per queue that has settings: declared in code (`app.queue`, written by every
-- worker at start) or changed live (`PATCH /v1/queues/{name}`, `tierline queue`). A live
-- change of a field wins over the code's declaration of it (`overrides` names those
-- fields) until the queue is reset. A queue without a row claims as it always did.
CREATE TABLE tierline.queues (
    name           text PRIMARY KEY,
    max_running    integer CHECK (max_running IS NULL OR max_running >= 0),
    rate_limit     text,              -- as written: '20/s'
    rate_count     integer CHECK (rate_count IS NULL OR rate_count >= 1),
    rate_period_s  double precision CHECK (rate_period_s IS NULL OR rate_period_s > 0),
    partition_by   text,              -- an argument name: the limits hold per its value
    paused         boolean     NOT NULL DEFAULT false,
    paused_at      timestamptz,
    declared       jsonb       NOT NULL DEFAULT '{}',
    overrides      text[]      NOT NULL DEFAULT '{}',
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- When jobs of rate-limited queues started (per partition), for the sliding window: a
-- queue with "20/s" starts no more than 20 jobs in any second. Pruned by upkeep once
-- older than the queue's period.
CREATE TABLE tierline.queue_starts (
    queue text        NOT NULL,
    part  text        NOT NULL,
    at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX queue_starts_idx ON tierline.queue_starts (queue, part, at);

-- Periodic jobs: what the code declared (`app.schedule`) and how far the scheduler got.
-- Each slot's job carries the idempotency key `schedule:NAME:SLOT`, so a slot has one
-- job however many workers race for it or restart.
CREATE TABLE tierline.schedules (
    name         text PRIMARY KEY,
    kind         text        NOT NULL,
    spec         text        NOT NULL,   -- 'cron:*/5 * * * *' or 'every:2'
    timezone     text        NOT NULL DEFAULT 'UTC',
    args         jsonb       NOT NULL DEFAULT '{}',
    catch_up     boolean     NOT NULL DEFAULT true,
    last_slot    timestamptz,            -- the newest slot enqueued (or skipped as missed)
    last_job_id  bigint,
    declared_at  timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Unique jobs: at most one job per key among the jobs in the key's states (a job that
-- leaves them, e.g. finishes, no longer blocks a new one). A key with a period carries
-- the period's number, so it is unique within each period.
ALTER TABLE tierline.jobs ADD COLUMN unique_key text, ADD COLUMN unique_states text[];
CREATE UNIQUE INDEX jobs_unique_key_idx ON tierline.jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state = ANY (unique_states);
