"""The peers of ``bench/compare``: their pinned versions and the settings each runs
with (read by the driver, which prints them, and by the peers' runner, which uses them).

The settings are the peers' own choices for throughput: pgqueuer's benchmark tool runs
on asyncpg with uvloop and batch dequeues; procrastinate fetches one job per query, so
its concurrency only needs to cover the jobs in flight. Where a workload fixes the
concurrency (I/O jobs: 16 per process), every system gets the same.
"""

from __future__ import annotations

# What `bench/compare` installs into its venv (bench/.peers-venv); a change rebuilds it.
PINS = (
    "pgqueuer==1.6.0",
    "procrastinate==3.10.0",
    "asyncpg==0.32.0",
    "uvloop==0.23.0",
    "psycopg[binary]==3.3.9",
    "psycopg-pool==3.3.3",
)

PGQ_DRAIN_BATCH = 1000
PGQ_PICKUP_BATCH = 10
PROC_DRAIN_CONCURRENCY = 100

SETTINGS = {
    "pgqueuer": {
        "driver": "asyncpg (AsyncpgDriver), uvloop",
        "schema": "Queries.install() (`pgq install`), durability 'durable' (the default: logged)",
        "drain": f"QueueManager.run(batch_size={PGQ_DRAIN_BATCH}), no concurrency cap (the "
        "claim size of Tierline's 1,000 slots; 10 and 100 drained slower here)",
        "io": "QueueManager.run(batch_size=8, max_concurrent_tasks=16) per process "
        "(batch_size may be at most half the cap)",
        "pickup": f"QueueManager.run(batch_size={PGQ_PICKUP_BATCH}) (the default), LISTEN/NOTIFY",
        "enqueue": "Queries.enqueue(entrypoint, payload, priority) on one autocommit "
        "connection; lists of 1,000 for batches",
        "finished jobs": "deleted from the queue table, a row in pgqueuer_log per status",
    },
    "procrastinate": {
        "driver": "PsycopgConnector (psycopg 3, AsyncConnectionPool max_size 20)",
        "schema": "schema_manager.apply_schema_async() (`procrastinate schema --apply`)",
        "drain": f"run_worker_async(concurrency={PROC_DRAIN_CONCURRENCY}) (fetches one job "
        "per query)",
        "io": "run_worker_async(concurrency=16) per process",
        "pickup": "run_worker_async() defaults (listen_notify=True)",
        "enqueue": "task.defer_async() one at a time; task.batch_defer_async(*1,000) for batches",
        "finished jobs": "kept (delete_jobs='never', the default), events by trigger",
    },
}
