"""Drain rate: how fast one worker process empties a backlog of no-op jobs.

The jobs are enqueued first (due far in the future), the worker is started and ready,
then one UPDATE makes them all due and wakes it. The rate is the job count divided by
``max(finished_at) - min(started_at)`` (database clock) and by the wall clock from that
UPDATE's commit until no job is left unfinished.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench import command, jobs, launch, output, percentiles, sampling
from tierline.testing.databases import dbname, query
from tierline.testing.ports import free_port

NAME = "drain"


def run_once(args: Any, concurrency: int | None, label: str) -> dict[str, Any]:
    with jobs.fresh_database(args.server_url) as url, launch.log_folder(NAME) as logs:
        asyncio.run(jobs.seed(url, "noop", {}, args.jobs, held=True))
        env: dict[str, Any] = {}
        if concurrency is not None:
            env["TIERLINE_WORKER_CONCURRENCY"] = concurrency
        port = free_port()
        with launch.processes() as procs:
            worker = launch.tierline(
                "worker",
                url,
                logs,
                f"worker-{label}",
                log_level=args.log_level,
                TIERLINE_WORKER_METRICS_PORT=port,
                **env,
            )
            procs.append(worker)
            launch.wait_ready(f"http://127.0.0.1:{port}", worker)
            sampler = sampling.DbSampler(args.server_url, dbname(url))
            sampler.start()
            cpu0 = sampling.cpu_seconds(worker.pid)
            t0 = time.monotonic()
            jobs.release(url)
            deadline = t0 + args.timeout
            while jobs.unfinished(url) and time.monotonic() < deadline:
                time.sleep(0.02)
            wall = time.monotonic() - t0
            worker_cpu = sampling.cpu_seconds(worker.pid) - cpu0
            sampler.sample()
        row = query(
            url,
            "SELECT count(*) FILTER (WHERE state = 'succeeded') AS succeeded, "
            "count(*) AS total, "
            "extract(epoch FROM max(finished_at) - min(started_at)) AS span_s "
            "FROM tierline.jobs",
        )[0]
    succeeded = int(row["succeeded"])
    span = float(row["span_s"] or 0.0)
    result = {
        "label": label,
        "concurrency": concurrency if concurrency is not None else 10,
        "jobs": args.jobs,
        "succeeded": succeeded,
        "complete": succeeded == args.jobs,
        "db_span_s": round(span, 3),
        "wall_s": round(wall, 3),
        "rate_db_per_s": round(succeeded / span, 1) if span > 0 else None,
        "rate_wall_per_s": round(succeeded / wall, 1) if wall > 0 else None,
        "worker_cpu_s": round(worker_cpu, 2),
        "db_cpu_s": _round(sampler.cpu_seconds()),
        "db_connections_max": sampler.max_connections(),
    }
    command.say(
        f"{label}: {succeeded}/{args.jobs} jobs, {result['rate_db_per_s']} jobs/s (db), "
        f"{result['rate_wall_per_s']} jobs/s (wall)"
    )
    return result


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def main(argv: list[str] | None = None) -> int:
    p = command.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    p.add_argument("--jobs", type=int, default=20_000, help="Backlog size (jobs).")
    p.add_argument(
        "--concurrency", type=int, default=1000, help="TIERLINE_WORKER_CONCURRENCY of the run."
    )
    p.add_argument("--repeat", type=int, default=3, help="Runs per configuration (median).")
    p.add_argument(
        "--reference-repeat",
        type=int,
        default=1,
        help="Runs at the default concurrency, for reference (0: none).",
    )
    p.add_argument("--timeout", type=float, default=120, help="Give up a run after (s).")
    args = p.parse_args(argv)
    if args.smoke:
        args.jobs, args.repeat, args.concurrency = 200, 1, 50
    machine = output.machine()
    configs: list[tuple[str, int | None, int]] = [
        (f"concurrency {args.concurrency}", args.concurrency, args.repeat)
    ]
    if args.reference_repeat > 0:
        configs.append(("default concurrency (10)", None, args.reference_repeat))
    runs: list[dict[str, Any]] = []
    for label, concurrency, repeat in configs:
        for i in range(repeat):
            runs.append({**run_once(args, concurrency, label), "run": i + 1})
    summary = []
    for label, concurrency, _ in configs:
        mine = [r for r in runs if r["label"] == label]
        summary.append(
            {
                "label": label,
                "concurrency": concurrency if concurrency is not None else 10,
                "median_rate_db_per_s": percentiles.median([r["rate_db_per_s"] or 0 for r in mine]),
                "median_rate_wall_per_s": percentiles.median(
                    [r["rate_wall_per_s"] or 0 for r in mine]
                ),
                "best_rate_db_per_s": max(r["rate_db_per_s"] or 0 for r in mine),
                "all_complete": all(r["complete"] for r in mine),
            }
        )
    target = {"min_jobs_per_s": 10_000, "aim_jobs_per_s": 15_000}
    data = {
        "machine": machine,
        "server": output.server_info(args.server_url),
        "log_level": args.log_level,
        "target": target,
        "summary": summary,
        "runs": runs,
        "meets_target": float(summary[0]["median_rate_db_per_s"]) >= target["min_jobs_per_s"],
    }
    md = [
        f"Drain of {args.jobs:,} no-op jobs by one worker process "
        f"(log level {args.log_level}; median of {args.repeat} runs, "
        f"{args.reference_repeat} at the default concurrency). "
        f"Target >= {target['min_jobs_per_s']:,} jobs/s (aim {target['aim_jobs_per_s']:,}).",
        "",
        output.table(
            ["configuration", "jobs/s (db clock)", "jobs/s (wall clock)", "best jobs/s"],
            [
                (
                    s["label"],
                    s["median_rate_db_per_s"],
                    s["median_rate_wall_per_s"],
                    s["best_rate_db_per_s"],
                )
                for s in summary
            ],
        ),
        "",
        output.table(
            [
                "configuration",
                "run",
                "jobs/s (db)",
                "jobs/s (wall)",
                "span s",
                "worker CPU s",
                "db CPU s",
            ],
            [
                (
                    r["label"],
                    r["run"],
                    r["rate_db_per_s"],
                    r["rate_wall_per_s"],
                    r["db_span_s"],
                    r["worker_cpu_s"],
                    r["db_cpu_s"] if r["db_cpu_s"] is not None else "n/a",
                )
                for r in runs
            ],
        ),
    ]

    def chart(path: Path) -> None:
        plt = output.pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = [s["label"] for s in summary]
        ax.bar(labels, [s["median_rate_db_per_s"] for s in summary], color="#4c72b0")
        ax.axhline(target["min_jobs_per_s"], color="#c44e52", ls="--", label="target")
        ax.set_ylabel("jobs/s")
        ax.set_title(f"Drain rate, {args.jobs:,} no-op jobs, one worker")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    output.write_results(NAME, args, data, "\n".join(md), chart)
    return 0 if all(s["all_complete"] for s in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
