"""The peers' side of ``bench/compare``: one workload on pgqueuer or procrastinate, through
their public APIs, in a fresh database with the peer's own schema; one JSON object on
stdout. Runs in the peers' venv (``bench/.peers-venv``), never in Tierline's: nothing
here imports tierline, and mypy skips this file (the peers are not in the main venv).

Each peer with the settings its own documentation and benchmark use for throughput
(``SETTINGS``, printed into the results): pgqueuer on asyncpg with uvloop (its benchmark
tool's driver), the schema by ``Queries.install()`` (what ``pgq install`` runs) at its
default durability (logged tables); procrastinate on its psycopg connector, the schema by
``schema_manager.apply_schema_async()`` (what ``procrastinate schema --apply`` runs).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

from bench import dbmeter, tally, workloads
from bench.peer_settings import (
    PGQ_DRAIN_BATCH,
    PGQ_PICKUP_BATCH,
    PROC_DRAIN_CONCURRENCY,
)


# -- pgqueuer -------------------------------------------------------------------------------
class Pgq:
    name = "pgqueuer"
    table = "pgqueuer"

    async def connect(self, url: str) -> Any:
        import asyncpg
        from pgqueuer import AsyncpgDriver
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(url)
        return Queries(AsyncpgDriver(conn)), conn

    async def install(self, url: str) -> None:
        q, conn = await self.connect(url)
        await q.install()
        await conn.close()

    async def enqueue(self, url: str, n: int, batch: int, meter: dbmeter.Meter) -> dict[str, Any]:
        q, conn = await self.connect(url)
        await q.enqueue("noop", None, 0)
        before = await asyncio.to_thread(meter.read)
        t0 = time.perf_counter()
        if batch == 1:
            for _ in range(n):
                await q.enqueue("noop", None, 0)
        else:
            for start in range(0, n, batch):
                size = min(batch, n - start)
                await q.enqueue(["noop"] * size, [None] * size, [0] * size)
        elapsed = time.perf_counter() - t0
        await conn.close()
        after = await asyncio.to_thread(meter.read)
        return {"elapsed": elapsed, "cost": meter.cost(before, after, n)}

    async def seed(self, url: str, entrypoint: str, n: int) -> None:
        q, conn = await self.connect(url)
        for start in range(0, n, 1000):
            size = min(1000, n - start)
            await q.enqueue([entrypoint] * size, [None] * size, [0] * size)
        await conn.close()

    async def worker(self, url: str, mode: str, concurrency: int) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, QueueManager
        from pgqueuer.models import Job
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(url)
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("noop")
        async def noop(job: Job) -> None:
            tally.mark()

        @qm.entrypoint("tally")
        async def tally_job(job: Job) -> None:
            tally.mark(int(job.payload or b"-1"))

        @qm.entrypoint("sleep")
        async def sleep(job: Job) -> None:
            await asyncio.sleep(workloads.IO_SLEEP_S)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, qm.shutdown.set)
        if mode == "drain":
            await qm.run(batch_size=PGQ_DRAIN_BATCH)
        elif mode == "io":
            await qm.run(batch_size=concurrency // 2, max_concurrent_tasks=concurrency)
        else:
            await qm.run(batch_size=PGQ_PICKUP_BATCH)

    def unfinished_sql(self) -> str:
        return "SELECT count(*) FROM pgqueuer"

    def span_sql(self) -> str:
        return (
            "SELECT count(*) FILTER (WHERE status = 'successful'), "
            "extract(epoch FROM max(created) FILTER (WHERE status = 'successful') "
            "- min(created) FILTER (WHERE status = 'picked'))::float8 FROM pgqueuer_log"
        )

    def first_start_sql(self) -> str:
        return (
            "SELECT extract(epoch FROM min(created))::float8 FROM pgqueuer_log "
            "WHERE status = 'picked'"
        )

    def finished_between_sql(self) -> str:
        return (
            "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful' "
            "AND created >= to_timestamp(%s) AND created < to_timestamp(%s)"
        )

    def succeeded_sql(self) -> str:
        return "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"


# -- procrastinate --------------------------------------------------------------------------
class Proc:
    name = "procrastinate"

    def app(self, url: str, pool_max: int = 20) -> Any:
        import procrastinate

        app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo=url, min_size=1, max_size=pool_max)
        )

        @app.task(name="noop")
        async def noop() -> None:
            tally.mark()

        @app.task(name="tally")
        async def tally_job(i: int = -1) -> None:
            tally.mark(i)

        @app.task(name="sleep")
        async def sleep() -> None:
            await asyncio.sleep(workloads.IO_SLEEP_S)

        self.tasks = {"noop": noop, "tally": tally_job, "sleep": sleep}
        return app

    async def install(self, url: str) -> None:
        app = self.app(url)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def enqueue(self, url: str, n: int, batch: int, meter: dbmeter.Meter) -> dict[str, Any]:
        app = self.app(url)
        async with app.open_async():
            noop = self.tasks["noop"]
            await noop.defer_async()
            before = await asyncio.to_thread(meter.read)
            t0 = time.perf_counter()
            if batch == 1:
                for _ in range(n):
                    await noop.defer_async()
            else:
                for start in range(0, n, batch):
                    await noop.batch_defer_async(*[{}] * min(batch, n - start))
            elapsed = time.perf_counter() - t0
        after = await asyncio.to_thread(meter.read)
        return {"elapsed": elapsed, "cost": meter.cost(before, after, n)}

    async def seed(self, url: str, entrypoint: str, n: int) -> None:
        app = self.app(url)
        async with app.open_async():
            for start in range(0, n, 1000):
                await self.tasks[entrypoint].batch_defer_async(*[{}] * min(1000, n - start))

    async def worker(self, url: str, mode: str, concurrency: int) -> None:
        conc = {"drain": PROC_DRAIN_CONCURRENCY, "io": concurrency}.get(mode, 1)
        app = self.app(url, pool_max=max(20, conc + 4) if mode == "io" else 20)
        async with app.open_async():
            await app.run_worker_async(concurrency=conc, install_signal_handlers=True)

    def unfinished_sql(self) -> str:
        return "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"

    def span_sql(self) -> str:
        return (
            "SELECT count(*) FILTER (WHERE type = 'succeeded'), "
            "extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded') "
            "- min(at) FILTER (WHERE type = 'started'))::float8 FROM procrastinate_events"
        )

    def first_start_sql(self) -> str:
        return (
            "SELECT extract(epoch FROM min(at))::float8 FROM procrastinate_events "
            "WHERE type = 'started'"
        )

    def finished_between_sql(self) -> str:
        return (
            "SELECT count(*) FROM procrastinate_events WHERE type = 'succeeded' "
            "AND at >= to_timestamp(%s) AND at < to_timestamp(%s)"
        )

    def succeeded_sql(self) -> str:
        return "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"


# -- the workloads, the same for both -------------------------------------------------------
def one(url: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql.encode(), params).fetchone()
        return row[0] if row else None


def start_workers(args: Any, peer: Any, w: workloads.Workers, n: int, tally_n: int = 0) -> None:
    env = {**os.environ}
    if tally_n:
        env.update(BENCH_TALLY_FILE=str(args.logs / "tally.json"), BENCH_TALLY_N=str(tally_n))
    for i in range(n):
        argv = [sys.executable, "-m", "bench.compare_peers", peer.name, "worker"]
        argv += ["--url", args.url, "--admin-url", args.admin_url, "--logs", str(args.logs)]
        argv += ["--mode", args.workload, "--concurrency", str(args.concurrency)]
        w.start(argv, env, args.logs / f"{peer.name}-worker-{i}.log")


def drain(args: Any, peer: Any, meter: dbmeter.Meter) -> dict[str, Any]:
    asyncio.run(peer.seed(args.url, "noop", args.jobs))
    before = meter.read()
    with workloads.Workers() as w:
        start_workers(args, peer, w, 1, tally_n=args.jobs)
        workloads.wait_until(
            lambda: int(one(args.url, peer.unfinished_sql())) == 0 or not w.alive(),
            args.timeout,
            "the drain",
        )
        # The last acknowledgements may still be buffered in the worker: wait for them.
        workloads.wait_until(
            lambda: int(one(args.url, peer.succeeded_sql())) >= args.jobs or not w.alive(),
            args.timeout,
            "every acknowledgement",
        )
    after = meter.read()
    import psycopg

    with psycopg.connect(args.url, autocommit=True) as conn:
        row = conn.execute(peer.span_sql().encode()).fetchone()
    n, span = (int(row[0]), float(row[1] or 0)) if row else (0, 0.0)
    marks = tally.read(args.logs / "tally.json") or []
    return {
        "jobs": args.jobs,
        "finished": n,
        "handler_rate": tally.span_rate(marks),
        "db_rate": n / span if span > 0 else None,
        "cost": meter.cost(before, after, args.jobs).per_job(),
    }


def io(args: Any, peer: Any, meter: dbmeter.Meter) -> dict[str, Any]:
    backlog = workloads.io_backlog(args.procs, args.concurrency, args.warmup, args.window)
    asyncio.run(peer.seed(args.url, "sleep", backlog))
    before = meter.read()
    with workloads.Workers() as w:
        start_workers(args, peer, w, args.procs)
        workloads.wait_until(
            lambda: one(args.url, peer.first_start_sql()) is not None,
            args.timeout,
            "the first job to start",
            every=0.02,
        )
        first = float(one(args.url, peer.first_start_sql()))
        now = float(one(args.url, "SELECT extract(epoch FROM clock_timestamp())::float8"))
        time.sleep(max(0.0, first + args.warmup + args.window + 0.5 - now))
        alive = w.alive()
    after = meter.read()
    counted = int(
        one(
            args.url,
            peer.finished_between_sql(),
            (first + args.warmup, first + args.warmup + args.window),
        )
    )
    done = int(one(args.url, peer.succeeded_sql()))
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


async def produce(args: Any, peer: Any) -> dict[int, float]:
    """Enqueue ``--jobs`` tally jobs one at a time at ``--rate``; i -> time returned."""
    returned: dict[int, float] = {}
    if isinstance(peer, Pgq):
        q, conn = await peer.connect(args.url)

        async def send(i: int) -> None:
            await q.enqueue("tally", str(i).encode(), 0)

        close: Any = conn.close
    else:
        app = peer.app(args.url)
        await app.open_async()
        task = peer.tasks["tally"]

        async def send(i: int) -> None:
            await task.defer_async(i=i)

        close = app.close_async
    await send(-1)  # the warm-up job: the worker is listening once it has run
    path = args.logs / "tally.json"
    await asyncio.to_thread(
        workloads.wait_until,
        lambda: int(one(args.url, peer.unfinished_sql())) == 0,
        args.timeout,
        "the warm-up job",
    )
    start = time.monotonic() + 0.2
    for i in range(args.jobs):
        delay = start + i / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(i)
        returned[i] = time.time()
    await asyncio.to_thread(workloads.wait_until, path.exists, args.timeout, "every job's handler")
    await close()
    return returned


def pickup(args: Any, peer: Any, meter: dbmeter.Meter) -> dict[str, Any]:
    with workloads.Workers() as w:
        start_workers(args, peer, w, 1, tally_n=args.jobs + 1)
        before = meter.read()
        returned = asyncio.run(produce(args, peer))
    after = meter.read()
    marks = tally.read(args.logs / "tally.json") or []
    delays = [t - returned[i] for i, t in marks if i in returned]
    return {
        "jobs": args.jobs,
        "measured": len(delays),
        "delay_ms": workloads.percentiles_ms(delays),
        "negative": sum(1 for d in delays if d < 0),
        "cost": meter.cost(before, after, args.jobs + 1).per_job(),
    }


def main(argv: list[str]) -> int:
    peers: dict[str, Any] = {"pgqueuer": Pgq(), "procrastinate": Proc()}
    if not argv or argv[0] not in peers:
        raise SystemExit(f"usage: compare_peers.py {{{','.join(peers)}}} WORKLOAD ...")
    peer = peers[argv[0]]
    args = workloads.parser(__doc__.splitlines()[0] if __doc__ else "").parse_args(argv[1:])
    args.logs.mkdir(parents=True, exist_ok=True)
    run = _uvloop_run if isinstance(peer, Pgq) else asyncio.run
    if args.workload == "worker":
        args.workload = args.mode
        run(peer.worker(args.url, args.mode, args.concurrency))
        return 0
    asyncio.run(peer.install(args.url))
    from bench.dbmeter import Meter

    meter = Meter(args.admin_url, args.url.rsplit("/", 1)[1].split("?")[0])
    if args.workload == "drain":
        result = drain(args, peer, meter)
    elif args.workload in ("enqueue_single", "enqueue_batch"):
        batch = 1 if args.workload == "enqueue_single" else args.batch
        got = run(peer.enqueue(args.url, args.jobs, batch, meter))
        stored = int(one(args.url, _count_sql(peer))) - 1
        result = {
            "jobs": args.jobs,
            "stored": stored,
            "rate": args.jobs / got["elapsed"] if got["elapsed"] > 0 else None,
            "cost": got["cost"].per_job(),
        }
    elif args.workload == "io":
        result = io(args, peer, meter)
    else:
        result = pickup(args, peer, meter)
    workloads.emit({"system": peer.name, "workload": args.workload, **result})
    return 0


def _count_sql(peer: Any) -> str:
    return "SELECT count(*) FROM " + ("pgqueuer" if isinstance(peer, Pgq) else "procrastinate_jobs")


def _uvloop_run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
