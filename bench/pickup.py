"""Pickup delay: how soon an idle worker starts a job after its enqueue committed.

Jobs are enqueued one at a time at a constant rate (``--rate``, default 50/s) by the
Python API; the handler records ``time.time()`` when it starts. The delay is that time
minus the moment ``enqueue`` returned (after the commit; same machine, same clock).
The database's view, ``started_at - created_at`` (``created_at`` is the start of the
enqueue transaction), is reported beside it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench import command, jobs, launch, output, percentiles
from tierline.testing.databases import query
from tierline.testing.ports import free_port
from tierline.testing.waiting import wait_for

NAME = "pickup"


async def produce(url: str, n: int, rate: float) -> dict[int, float]:
    """Enqueue ``n`` stamp jobs at ``rate``/s; job id -> time enqueue returned."""
    returned: dict[int, float] = {}
    async with jobs.producer(url) as app:
        await app.enqueue("noop")  # open the pool before the clock starts
        start = time.monotonic() + 0.2
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            job = await app.enqueue("stamp")
            returned[job.id] = time.time()
    return returned


def main(argv: list[str] | None = None) -> int:
    p = command.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    p.add_argument("--jobs", type=int, default=1000, help="Jobs enqueued.")
    p.add_argument("--rate", type=float, default=50.0, help="Enqueue rate (jobs/s).")
    args = p.parse_args(argv)
    if args.smoke:
        args.jobs = 20
    machine = output.machine()
    with jobs.fresh_database(args.server_url) as url, launch.log_folder(NAME) as logs:
        port = free_port()
        with launch.processes() as procs:
            worker = launch.tierline(
                "worker",
                url,
                logs,
                "worker",
                log_level=args.log_level,
                TIERLINE_APP="bench.apps:app",
                TIERLINE_WORKER_METRICS_PORT=port,
            )
            procs.append(worker)
            launch.wait_ready(f"http://127.0.0.1:{port}", worker)
            returned = asyncio.run(produce(url, args.jobs, args.rate))
            wait_for(lambda: jobs.unfinished(url) == 0, 60, "every job finished", tolerate=())
        rows = query(
            url,
            "SELECT id, (result->>'t')::float8 AS t, "
            "extract(epoch FROM started_at - created_at)::float8 AS db_s "
            "FROM tierline.jobs WHERE kind = 'stamp' AND state = 'succeeded'",
        )
    client = [r["t"] - returned[r["id"]] for r in rows if r["id"] in returned]
    db = [float(r["db_s"]) for r in rows]
    negatives = sum(1 for d in client if d < 0)
    stats_client = percentiles.summary_ms(client)
    stats_db = percentiles.summary_ms(db)
    target_ms = 10.0
    command.say(
        f"pickup delay over {len(client)} jobs: p50 {stats_client['p50']} ms, "
        f"p90 {stats_client['p90']} ms, p99 {stats_client['p99']} ms"
    )
    data = {
        "machine": machine,
        "server": output.server_info(args.server_url),
        "jobs": args.jobs,
        "rate_per_s": args.rate,
        "finished": len(rows),
        "handler_start_minus_enqueue_return_ms": stats_client,
        "db_started_minus_created_ms": stats_db,
        "handler_started_before_enqueue_returned": negatives,
        "target_p99_ms": target_ms,
        "meets_target": stats_client["p99"] <= target_ms,
    }
    md = [
        f"Pickup delay of an idle worker (default concurrency), {args.jobs:,} jobs enqueued "
        f"one at a time at {args.rate:g}/s. Target: p99 <= {target_ms:g} ms.",
        "",
        output.table(
            ["measure", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"],
            [
                (
                    "handler start - enqueue returned",
                    stats_client["p50"],
                    stats_client["p90"],
                    stats_client["p99"],
                    stats_client["p99_9"],
                    stats_client["max"],
                ),
                (
                    "started_at - created_at (database)",
                    stats_db["p50"],
                    stats_db["p90"],
                    stats_db["p99"],
                    stats_db["p99_9"],
                    stats_db["max"],
                ),
            ],
        ),
    ]
    if negatives:
        md += [
            "",
            f"{negatives} handlers started before their `enqueue` call had returned "
            "(the NOTIFY raced the reply); they count as negative delays.",
        ]

    def chart(path: Path) -> None:
        plt = output.pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist([d * 1000 for d in client], bins=50, color="#4c72b0")
        ax.axvline(target_ms, color="#c44e52", ls="--", label="p99 target")
        ax.set_xlabel("pickup delay (ms)")
        ax.set_ylabel("jobs")
        ax.set_title(f"Pickup delay at {args.rate:g} jobs/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    output.write_results(NAME, args, data, "\n".join(md), chart)
    return 0 if len(rows) == args.jobs else 1


if __name__ == "__main__":
    raise SystemExit(main())
