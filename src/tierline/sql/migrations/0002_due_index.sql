-- Tierline schema, version 2: an index for promoting scheduled and retrying jobs.
--
-- Upkeep (`promote_due`) looks for scheduled and retrying jobs whose time has come, every
-- few seconds. Without an index of its own it walked every waiting job (available ones
-- included) or, with statistics from before a backlog arrived, the whole table: 13 to 31
-- ms at 55,000 waiting jobs, and all future-scheduled jobs on every round. Only scheduled
-- and retrying rows are in it, so enqueueing a job that is due at once costs nothing more.
CREATE INDEX jobs_due_idx ON tierline.jobs (run_at)
    WHERE state IN ('scheduled', 'retrying');
