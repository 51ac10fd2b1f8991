"""Where Tierline's write path goes: per statement, on a private PostgreSQL 15 with the
machine's durability settings and ``pg_stat_statements``.

1. Enqueue ``--single-jobs`` jobs one at a time (``App.enqueue``) and ``--batches``
   batches of 1,000 (``App.enqueue_many``), then drain them all with one ``tierline
   worker`` (1,000 slots); ``pg_stat_statements`` of the database: calls, rows, time,
   WAL bytes and dirtied buffers of each statement, per job.
2. ``EXPLAIN (ANALYZE, BUFFERS, WAL)`` of the enqueue statements (one job; 1,000 jobs).
3. Variants of the enqueue statements, run side by side in fresh databases, alternating:
   Tierline's statement as it is, without its NOTIFY, without its ``enqueued`` event
   row, and as it is with the ``jobs_state_id_idx`` index that schema version 6
   dropped put back (what it cost before): WAL bytes and
   time per job, so each part's cost is measured rather than guessed. The variants are
   analysis only; nothing here changes what Tierline runs.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench import command, compare, jobs, launch, output, workloads
from tierline.enqueue import dumps, single_params
from tierline.jobs import JobRequest
from tierline.queries import QUERIES
from tierline.testing.databases import dbname, migrate, query, scratch_database
from tierline.testing.ports import free_port

NAME = "write-path"


def statement_name(sql: str) -> str:
    """The named query a ``pg_stat_statements`` text is, else its first words."""
    flat = " ".join(sql.split())
    for name, text in QUERIES.items():
        if " ".join(str(text).split())[:60] == flat[:60] and flat[:60]:
            return name
    return flat[:60]


async def produce(url: str, single: int, batches: int) -> None:
    async with jobs.producer(url) as app:
        for _ in range(single):
            await app.enqueue("noop")
        reqs = [JobRequest(kind="noop", args={})] * 1000
        for _ in range(batches):
            await app.enqueue_many(reqs)


def drain(url: str, total: int, logs: Any) -> None:
    w = workloads.Workers()
    with w:
        port = free_port()
        proc = launch.tierline(
            "worker",
            url,
            logs,
            "worker",
            TIERLINE_WORKER_CONCURRENCY=1000,
            TIERLINE_WORKER_METRICS_PORT=port,
        )
        w.procs.append(proc.proc)
        workloads.wait_until(lambda: jobs.unfinished(url) == 0, 600, "the drain")


def stat_statements(admin: str, db: str, jobs_total: int) -> list[dict[str, Any]]:
    rows = query(
        admin,
        "SELECT s.query, s.calls, s.rows, s.total_exec_time, s.wal_bytes::bigint AS wal, "
        "s.wal_records, s.wal_fpi, s.shared_blks_dirtied, s.shared_blks_hit "
        "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
        "WHERE d.datname = %s ORDER BY s.wal_bytes DESC, s.total_exec_time DESC",
        (db,),
    )
    out = []
    for r in rows:
        if not r["calls"]:
            continue
        out.append(
            {
                "statement": statement_name(r["query"]),
                "calls": int(r["calls"]),
                "rows": int(r["rows"]),
                "ms_per_call": round(float(r["total_exec_time"]) / int(r["calls"]), 3),
                "wal_bytes": int(r["wal"]),
                "wal_bytes_per_job": round(int(r["wal"]) / jobs_total, 1),
                "wal_records": int(r["wal_records"]),
                "wal_fpi": int(r["wal_fpi"]),
                "blks_dirtied": int(r["shared_blks_dirtied"]),
            }
        )
    return out


def enqueue_params(app: Any, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parameters Tierline sends for one job and for a batch of ``n``."""
    row = app.prepare(JobRequest(kind="noop", args={}))
    return single_params(row), {"batch": Jsonb([row] * n, dumps=dumps)}


def explain(url: str, sql: str, params: dict[str, Any]) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(3):  # warm: the first plans and the first pages
            conn.execute(sql.encode(), params)
        cur = conn.execute(b"EXPLAIN (ANALYZE, BUFFERS, WAL) " + sql.encode(), params)
        return "\n".join(r[0] for r in cur.fetchall())


def without_notify(sql: str) -> str:
    """The statement with its ``pg_notify`` calls replaced by a constant."""
    return re.sub(r"pg_notify\('tierline_(jobs|events)',", r"concat('\1',", sql)


def without_event(sql: str) -> str:
    """The statement without its enqueue record (one ``job_events`` row per statement
    since schema 7; one per job before): the CTE made a no-op."""
    start = sql.index("ev AS (")
    end = sql.index("\n)", start)
    return sql[:start] + "ev AS (SELECT 1" + sql[end:]


def variants() -> dict[str, dict[str, str]]:
    base = {"single": str(QUERIES["enqueue"]), "batch": str(QUERIES["enqueue_batch"])}
    return {
        "as is": base,
        "no NOTIFY": {k: without_notify(v) for k, v in base.items()},
        "no enqueue record": {k: without_event(v) for k, v in base.items()},
        "with jobs_state_id_idx": base,
    }


def run_variant(
    admin: str, name: str, sql: str, params: dict[str, Any], calls: int, per_call: int
) -> dict[str, Any]:
    with scratch_database(admin, f"tierline_bench_wp_{uuid.uuid4().hex[:8]}") as url:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            if name == "with jobs_state_id_idx":  # dropped by migration 0006
                conn.execute(b"CREATE INDEX jobs_state_id_idx ON tierline.jobs (state, id)")
            for _ in range(3):
                conn.execute(sql.encode(), params)
            lsn0 = conn.execute(b"SELECT pg_current_wal_lsn()::text").fetchone()
            assert lsn0 is not None
            t0 = time.perf_counter()
            for _ in range(calls):
                conn.execute(sql.encode(), params).fetchall()
            elapsed = time.perf_counter() - t0
            row = conn.execute(
                b"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint", (lsn0[0],)
            ).fetchone()
    n = calls * per_call
    wal = int(row[0]) if row else 0
    return {"wal_bytes_per_job": wal / n, "us_per_job": 1e6 * elapsed / n}


def main(argv: list[str] | None = None) -> int:
    p = command.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    p.add_argument("--single-jobs", type=int, default=2000)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--variant-calls", type=int, default=1000, help="One-job statements.")
    p.add_argument("--variant-batches", type=int, default=20, help="1,000-job statements.")
    p.add_argument("--rounds", type=int, default=3, help="Rounds of the variants.")
    args = p.parse_args(argv)
    args.private_server = True
    if args.smoke:
        args.single_jobs, args.batches, args.variant_calls, args.variant_batches = 20, 2, 20, 2
        args.rounds = 1
    machine = output.machine()
    total = args.single_jobs + 1000 * args.batches
    from bench.apps import app

    single_params, batch_params = enqueue_params(app, 1000)
    with compare.server(args) as admin:
        server = output.server_info(admin)
        with (
            scratch_database(admin, f"tierline_bench_wp_{uuid.uuid4().hex[:8]}") as url,
            launch.log_folder(NAME) as logs,
        ):
            migrate(url)
            query(admin, "SELECT pg_stat_statements_reset()")
            asyncio.run(produce(url, args.single_jobs, args.batches))
            drain(url, total, logs)
            time.sleep(1)
            stats = stat_statements(admin, dbname(url), total)
            plans = {
                "enqueue (one job)": explain(url, str(QUERIES["enqueue"]), single_params),
                "enqueue_batch (1,000 jobs)": explain(
                    url, str(QUERIES["enqueue_batch"]), batch_params
                ),
            }
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        names = list(variants())
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for name in order:
                v = variants()[name]
                one = run_variant(admin, name, v["single"], single_params, args.variant_calls, 1)
                many = run_variant(
                    admin, name, v["batch"], batch_params, args.variant_batches, 1000
                )
                results.setdefault(name, {"single": [], "batch": []})
                results[name]["single"].append(one)
                results[name]["batch"].append(many)
                command.say(f"variant {name!r}: single {one}, batch {many}")
    summary = {
        name: {
            mode: {
                k: round(statistics.median(x[k] for x in runs), 2)
                for k in ("wal_bytes_per_job", "us_per_job")
            }
            for mode, runs in modes.items()
        }
        for name, modes in results.items()
    }
    data = {
        "machine": machine,
        "server": server,
        "jobs": total,
        "statements": stats,
        "plans": plans,
        "variants": summary,
        "variant_runs": results,
    }
    md = [
        f"{args.single_jobs:,} jobs enqueued one at a time and {args.batches} batches of "
        f"1,000, then drained by one `tierline worker` (1,000 slots), on a private "
        f"PostgreSQL {server['version']} (synchronous_commit {server['synchronous_commit']}, "
        f"fsync and full_page_writes on); `pg_stat_statements` of the database, per job of "
        f"the {total:,}:",
        "",
        output.table(
            ["statement", "calls", "rows", "ms/call", "WAL bytes/job", "WAL FPI", "dirtied"],
            [
                (
                    s["statement"],
                    s["calls"],
                    s["rows"],
                    s["ms_per_call"],
                    s["wal_bytes_per_job"],
                    s["wal_fpi"],
                    s["blks_dirtied"],
                )
                for s in stats
                if s["wal_bytes"] > 0 or s["ms_per_call"] > 0.05
            ],
        ),
        "",
        f"Variants of the enqueue statements (analysis only), medians of {args.rounds} "
        "alternating rounds, each in a fresh database; time is the client's, one connection:",
        "",
        output.table(
            [
                "variant",
                "one job: WAL bytes",
                "one job: us",
                "batch: WAL bytes/job",
                "batch: us/job",
            ],
            [
                (
                    name,
                    s["single"]["wal_bytes_per_job"],
                    s["single"]["us_per_job"],
                    s["batch"]["wal_bytes_per_job"],
                    s["batch"]["us_per_job"],
                )
                for name, s in summary.items()
            ],
        ),
    ]
    for title, plan in plans.items():
        md += ["", f"`EXPLAIN (ANALYZE, BUFFERS, WAL)` of {title}:", "", "```", plan, "```"]
    output.write_results(NAME, args, data, "\n".join(md))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
