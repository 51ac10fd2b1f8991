"""The physical limit of ``bench/limit``: the cheapest SQL that does a workload's work on
the same server, with no events, no NOTIFY, no leases and no Python framework around it.

- A job table with what a queue cannot do without: id, queue, kind, arguments, state;
  logged, one partial index that the claim walks (waiting jobs by id).
- Enqueue one at a time: a single-row ``INSERT ... RETURNING id`` per job, each its own
  transaction (autocommit), so each commit waits for its WAL flush like Tierline's.
- Enqueue in batches: one ``INSERT ... SELECT FROM unnest(...) RETURNING id`` per batch,
  the arguments sent by the client.
- Drain: one connection, a loop of a claim (``UPDATE ... WHERE id IN (SELECT ... FOR
  UPDATE SKIP LOCKED LIMIT n) RETURNING``) and a finishing ``UPDATE`` of the claimed ids,
  each committed; n = 1,000, the slots of Tierline's drain.

Prints one JSON object like the other runners (``bench/workloads.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg

from bench import dbmeter, workloads
from tierline.testing.databases import dbname

SCHEMA = """
CREATE TABLE limit_jobs (
    id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text  NOT NULL,
    kind  text  NOT NULL,
    args  jsonb NOT NULL DEFAULT '{}',
    state text  NOT NULL DEFAULT 'available'
);
CREATE INDEX limit_jobs_waiting_idx ON limit_jobs (id) WHERE state = 'available';
"""
INSERT_ONE = "INSERT INTO limit_jobs (queue, kind, args) VALUES (%s, %s, %s) RETURNING id"
INSERT_MANY = (
    "INSERT INTO limit_jobs (queue, kind, args) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::jsonb[]) RETURNING id"
)
CLAIM = (
    "UPDATE limit_jobs SET state = 'running' WHERE id IN ("
    "SELECT id FROM limit_jobs WHERE state = 'available' ORDER BY id "
    "LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, kind, args"
)
FINISH = "UPDATE limit_jobs SET state = 'succeeded' WHERE id = ANY(%s)"
CLAIM_SIZE = 1000
ARGS = json.dumps({})


async def enqueue(args: Any, meter: dbmeter.Meter, batch: int) -> dict[str, Any]:
    conn = await psycopg.AsyncConnection.connect(args.url, autocommit=True)
    await conn.execute(INSERT_ONE, ("default", "noop", ARGS))  # planned, warm
    before = await asyncio.to_thread(meter.read)
    t0 = time.perf_counter()
    if batch == 1:
        for _ in range(args.jobs):
            await (await conn.execute(INSERT_ONE, ("default", "noop", ARGS))).fetchone()
    else:
        for start in range(0, args.jobs, batch):
            n = min(batch, args.jobs - start)
            cur = await conn.execute(INSERT_MANY, (["default"] * n, ["noop"] * n, [ARGS] * n))
            await cur.fetchall()
    elapsed = time.perf_counter() - t0
    await conn.close()
    after = await asyncio.to_thread(meter.read)
    stored = _count(args.url) - 1
    return {
        "jobs": args.jobs,
        "stored": stored,
        "rate": args.jobs / elapsed if elapsed > 0 else None,
        "cost": meter.cost(before, after, args.jobs).per_job(),
    }


async def drain(args: Any, meter: dbmeter.Meter) -> dict[str, Any]:
    conn = await psycopg.AsyncConnection.connect(args.url, autocommit=True)
    for start in range(0, args.jobs, 1000):
        n = min(1000, args.jobs - start)
        await conn.execute(INSERT_MANY, (["default"] * n, ["noop"] * n, [ARGS] * n))
    await conn.execute("ANALYZE limit_jobs")
    await conn.close()
    before = await asyncio.to_thread(meter.read)
    conn = await psycopg.AsyncConnection.connect(args.url, autocommit=True)
    done = 0
    t0 = time.perf_counter()
    while True:
        rows = await (await conn.execute(CLAIM, (CLAIM_SIZE,))).fetchall()
        if not rows:
            break
        await conn.execute(FINISH, ([r[0] for r in rows],))
        done += len(rows)
    elapsed = time.perf_counter() - t0
    await conn.close()
    after = await asyncio.to_thread(meter.read)
    rate = done / elapsed if elapsed > 0 else None
    return {
        "jobs": args.jobs,
        "finished": done,
        "handler_rate": None,
        "db_rate": rate,
        "cost": meter.cost(before, after, args.jobs).per_job(),
    }


def _count(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM limit_jobs").fetchone()
        return int(row[0]) if row else 0


def main(argv: list[str] | None = None) -> int:
    args = workloads.parser(__doc__.splitlines()[0] if __doc__ else "").parse_args(argv)
    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    meter = dbmeter.Meter(args.admin_url, dbname(args.url))
    if args.workload == "drain":
        result = asyncio.run(drain(args, meter))
    elif args.workload == "enqueue_single":
        result = asyncio.run(enqueue(args, meter, 1))
    elif args.workload == "enqueue_batch":
        result = asyncio.run(enqueue(args, meter, args.batch))
    else:
        raise SystemExit(f"no limit for workload {args.workload!r}")
    workloads.emit({"system": "limit", "workload": args.workload, **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
