"""Tierline's side of ``bench/compare``: one workload in a fresh database, through the
public API (``App.enqueue``, ``App.enqueue_many``) and real ``tierline worker``
processes; one JSON object on stdout (``bench/workloads.py`` says what each holds).

Settings, the ones ``docs/benchmarks.md`` records for Tierline's own benchmarks: drain
with ``TIERLINE_WORKER_CONCURRENCY=1000``; I/O jobs with 16 per process; pickup with the
default worker settings; log level info. Enqueue through a producer ``App`` with its
private pool (one statement per enqueue, autocommit), on uvloop as Tierline's own
processes run (``tierline web`` and ``worker``; uvicorn[standard] brings it) and as
pgqueuer's producer runs here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench import dbmeter, jobs, launch, tally, workloads
from tierline.lifecycle import uvloop_policy
from tierline.testing.databases import dbname, migrate, query
from tierline.testing.ports import free_port

DRAIN_CONCURRENCY = 1000
SETTINGS = {
    "drain": f"one `tierline worker`, TIERLINE_WORKER_CONCURRENCY={DRAIN_CONCURRENCY}",
    "enqueue": "`App.enqueue` / `App.enqueue_many` on the producer's private pool, uvloop",
    "io": "TIERLINE_WORKER_CONCURRENCY=16 per `tierline worker` process",
    "pickup": "one idle `tierline worker`, default settings (LISTEN/NOTIFY wake-up)",
    "durability": "logged tables, synchronous_commit as the server has it",
}


def worker(args: Any, w: workloads.Workers, name: str, *, tally_n: int = 0, **env: Any) -> str:
    """Start a ``tierline worker`` running the benchmark app; its metrics URL."""
    port = free_port()
    extra: dict[str, Any] = {}
    if tally_n:
        extra = {"BENCH_TALLY_FILE": str(args.logs / "tally.json"), "BENCH_TALLY_N": tally_n}
    proc = launch.tierline(
        "worker",
        args.url,
        args.logs,
        name,
        TIERLINE_APP="bench.apps:app",
        TIERLINE_WORKER_METRICS_PORT=port,
        **extra,
        **env,
    )
    w.procs.append(proc.proc)
    base = f"http://127.0.0.1:{port}"
    launch.wait_ready(base, proc)
    return base


def drain(args: Any, meter: dbmeter.Meter) -> dict[str, Any]:
    asyncio.run(jobs.seed(args.url, "tally", {}, args.jobs))
    before = meter.read()
    with workloads.Workers() as w:
        worker(args, w, "worker", tally_n=args.jobs, TIERLINE_WORKER_CONCURRENCY=DRAIN_CONCURRENCY)
        workloads.wait_until(lambda: jobs.unfinished(args.url) == 0, args.timeout, "the drain")
    after = meter.read()
    row = query(
        args.url,
        "SELECT count(*) FILTER (WHERE state = 'succeeded') AS n, "
        "extract(epoch FROM max(finished_at) - min(started_at))::float8 AS span "
        "FROM tierline.jobs",
    )[0]
    marks = tally.read(args.logs / "tally.json") or []
    span = float(row["span"] or 0)
    return {
        "jobs": args.jobs,
        "finished": int(row["n"]),
        "handler_rate": tally.span_rate(marks),
        "db_rate": int(row["n"]) / span if span > 0 else None,
        "cost": meter.cost(before, after, args.jobs).per_job(),
    }


async def _enqueue(args: Any, meter: dbmeter.Meter, batch: int) -> dict[str, Any]:
    from tierline.jobs import JobRequest

    async with jobs.producer(args.url) as app:
        await app.enqueue("noop")  # the pool open and the statement planned
        before = await asyncio.to_thread(meter.read)
        requests = [JobRequest(kind="noop", args={}) for _ in range(batch)]
        t0 = time.perf_counter()
        if batch == 1:
            for _ in range(args.jobs):
                await app.enqueue("noop")
        else:
            for start in range(0, args.jobs, batch):
                await app.enqueue_many(requests[: min(batch, args.jobs - start)])
        elapsed = time.perf_counter() - t0
    # Read once the producer's connections are closed: a backend reports its
    # transactions to pg_stat_database when it exits (or idles for a while).
    after = await asyncio.to_thread(meter.read)
    stored = int(query(args.url, "SELECT count(*) AS n FROM tierline.jobs")[0]["n"]) - 1
    return {
        "jobs": args.jobs,
        "stored": stored,
        "rate": args.jobs / elapsed if elapsed > 0 else None,
        "cost": meter.cost(before, after, args.jobs).per_job(),
    }


def io(args: Any, meter: dbmeter.Meter) -> dict[str, Any]:
    backlog = workloads.io_backlog(args.procs, args.concurrency, args.warmup, args.window)
    asyncio.run(jobs.seed(args.url, "sleep", {"seconds": workloads.IO_SLEEP_S}, backlog))
    before = meter.read()
    with workloads.Workers() as w:
        for i in range(args.procs):
            worker(args, w, f"worker-{i}", TIERLINE_WORKER_CONCURRENCY=args.concurrency)
        first = _first_start(args)
        time.sleep(max(0.0, first + args.warmup + args.window + 0.5 - _db_now(args)))
        alive = w.alive()
    after = meter.read()
    counted = _finished_between(args, first + args.warmup, first + args.warmup + args.window)
    done = int(query(args.url, "SELECT count(*) AS n FROM tierline.jobs "
                     "WHERE state = 'succeeded'")[0]["n"])  # fmt: skip
    ideal = args.procs * args.concurrency / workloads.IO_SLEEP_S
    rate = counted / args.window
    return {
        "procs": args.procs,
        "concurrency": args.concurrency,
        "backlog": backlog,
        "finished_in_window": counted,
        "rate": rate,
        "ideal": ideal,
        "pct_of_ideal": 100 * rate / ideal,
        "workers_alive": alive,
        "backlog_lasted": done < backlog,
        "cost": meter.cost(before, after, max(done, 1)).per_job(),
    }


def _db_now(args: Any) -> float:
    return float(
        query(args.url, "SELECT extract(epoch FROM clock_timestamp())::float8 AS t")[0]["t"]
    )


def _first_start(args: Any) -> float:
    def started() -> bool:
        return bool(
            query(args.url, "SELECT 1 FROM tierline.jobs WHERE started_at IS NOT NULL LIMIT 1")
        )

    workloads.wait_until(started, args.timeout, "the first job to start", every=0.02)
    row = query(
        args.url, "SELECT extract(epoch FROM min(started_at))::float8 AS t FROM tierline.jobs"
    )
    return float(row[0]["t"])


def _finished_between(args: Any, a: float, b: float) -> int:
    row = query(
        args.url,
        "SELECT count(*) AS n FROM tierline.jobs WHERE state = 'succeeded' "
        "AND finished_at >= to_timestamp(%s) AND finished_at < to_timestamp(%s)",
        (a, b),
    )
    return int(row[0]["n"])


async def _produce(args: Any) -> dict[int, float]:
    returned: dict[int, float] = {}
    async with jobs.producer(args.url) as app:
        await app.enqueue("noop")
        start = time.monotonic() + 0.2
        for i in range(args.jobs):
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await app.enqueue("tally", {"i": i})
            returned[i] = time.time()
    return returned


def pickup(args: Any, meter: dbmeter.Meter) -> dict[str, Any]:
    with workloads.Workers() as w:
        worker(args, w, "worker", tally_n=args.jobs)
        before = meter.read()
        returned = asyncio.run(_produce(args))
        path = args.logs / "tally.json"
        workloads.wait_until(lambda: path.exists(), args.timeout, "every job's handler")
        after = meter.read()
    marks = tally.read(path) or []
    delays = [t - returned[i] for i, t in marks if i in returned]
    return {
        "jobs": args.jobs,
        "measured": len(delays),
        "delay_ms": workloads.percentiles_ms(delays),
        "negative": sum(1 for d in delays if d < 0),
        "cost": meter.cost(before, after, args.jobs + 1).per_job(),
    }


def main(argv: list[str] | None = None) -> int:
    args = workloads.parser(__doc__.splitlines()[0] if __doc__ else "").parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    migrate(args.url)
    meter = dbmeter.Meter(args.admin_url, dbname(args.url))
    if args.workload == "drain":
        result = drain(args, meter)
    elif args.workload == "enqueue_single":
        uvloop_policy()
        result = asyncio.run(_enqueue(args, meter, 1))
    elif args.workload == "enqueue_batch":
        uvloop_policy()
        result = asyncio.run(_enqueue(args, meter, args.batch))
    elif args.workload == "io":
        result = io(args, meter)
    elif args.workload == "pickup":
        result = pickup(args, meter)
    else:
        raise SystemExit(f"no workload {args.workload!r} for Tierline")
    workloads.emit({"system": "tierline", "workload": args.workload, **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None))
