"""Enqueue rate from one producer process: the Python API batched and one at a time, and
the HTTP API (``POST /v1/jobs/batch`` and ``POST /v1/jobs``) against one web replica.

Every mode runs in a fresh database and is warmed up with one call (pool open, first
statement) before the clock starts. One-at-a-time modes may use a smaller count
(``--single-jobs``) than the batched ones; the rate is what is reported.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from bench import command, jobs, launch, output, percentiles
from tierline.testing.databases import query
from tierline.testing.ports import free_port

NAME = "enqueue"
JOB = {"kind": "noop", "args": {}}


async def api_batched(url: str, n: int, batch: int) -> float:
    from tierline.jobs import JobRequest

    async with jobs.producer(url) as app:
        await app.enqueue("noop")
        requests = [JobRequest(kind="noop", args={}) for _ in range(batch)]
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            await app.enqueue_many(requests[: min(batch, n - start)])
        return time.perf_counter() - t0


async def api_single(url: str, n: int) -> float:
    async with jobs.producer(url) as app:
        await app.enqueue("noop")
        t0 = time.perf_counter()
        for _ in range(n):
            await app.enqueue("noop")
        return time.perf_counter() - t0


def http_mode(args: Any, url: str, logs: Path, mode: str, n: int) -> float:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with launch.processes() as procs:
        web = launch.tierline(
            "web", url, logs, f"web-{mode}", log_level=args.log_level, TIERLINE_WEB_PORT=port
        )
        procs.append(web)
        launch.wait_ready(base, web)
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=base, timeout=60, headers=headers) as client:
            client.post("/v1/jobs", content=json.dumps(JOB)).raise_for_status()
            if mode == "http_batch":
                body = json.dumps({"jobs": [JOB] * args.batch}).encode()
                t0 = time.perf_counter()
                sent = 0
                while sent < n:
                    size = min(args.batch, n - sent)
                    data = body if size == args.batch else json.dumps({"jobs": [JOB] * size})
                    client.post("/v1/jobs/batch", content=data).raise_for_status()
                    sent += size
                return time.perf_counter() - t0
            body = json.dumps(JOB).encode()
            t0 = time.perf_counter()
            for _ in range(n):
                client.post("/v1/jobs", content=body).raise_for_status()
            return time.perf_counter() - t0


def count_jobs(url: str) -> int:
    return int(query(url, "SELECT count(*) AS n FROM tierline.jobs")[0]["n"])


MODES = {
    "api_batched": "Python API, `App.enqueue_many`, {batch} per call",
    "api_single": "Python API, `app.enqueue`, one at a time",
    "http_batch": "HTTP `POST /v1/jobs/batch`, {batch} per request",
    "http_single": "HTTP `POST /v1/jobs`, one at a time",
}
TARGETS = {"api_batched": 35_000, "api_single": 1_500}


def run_mode(args: Any, mode: str) -> dict[str, Any]:
    n = {"api_batched": args.jobs, "http_batch": args.jobs, "api_single": args.single_jobs}.get(
        mode, args.http_single_jobs
    )
    with jobs.fresh_database(args.server_url) as url, launch.log_folder(NAME) as logs:
        if mode == "api_batched":
            elapsed = asyncio.run(api_batched(url, n, args.batch))
        elif mode == "api_single":
            elapsed = asyncio.run(api_single(url, n))
        else:
            elapsed = http_mode(args, url, logs, mode, n)
        stored = count_jobs(url) - 1  # minus the warm-up job
    rate = n / elapsed if elapsed > 0 else 0.0
    command.say(f"{mode}: {n} jobs in {elapsed:.3f} s = {rate:,.0f} jobs/s")
    return {
        "mode": mode,
        "jobs": n,
        "stored": stored,
        "elapsed_s": round(elapsed, 4),
        "rate_per_s": round(rate, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = command.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    p.add_argument("--jobs", type=int, default=20_000, help="Jobs per batched run.")
    p.add_argument(
        "--single-jobs", type=int, default=5_000, help="Jobs per one-at-a-time run (fewer)."
    )
    p.add_argument(
        "--http-single-jobs", type=int, default=2_000, help="Jobs per HTTP one-at-a-time run."
    )
    p.add_argument("--batch", type=int, default=1000, help="Jobs per batch.")
    p.add_argument("--repeat", type=int, default=3, help="Runs per mode (median).")
    p.add_argument(
        "--modes", default=",".join(MODES), help=f"Comma-separated subset of {','.join(MODES)}."
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.jobs, args.single_jobs, args.batch, args.repeat = 300, 30, 100, 1
        args.http_single_jobs = 30
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes: {sorted(unknown)}")
    machine = output.machine()
    runs = [{**run_mode(args, mode), "run": i + 1} for mode in modes for i in range(args.repeat)]
    summary = []
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        rate = percentiles.median([r["rate_per_s"] for r in mine])
        target = TARGETS.get(mode)
        summary.append(
            {
                "mode": mode,
                "description": MODES[mode].format(batch=args.batch),
                "jobs_per_run": mine[0]["jobs"],
                "median_rate_per_s": rate,
                "best_rate_per_s": max(r["rate_per_s"] for r in mine),
                "target_per_s": target,
                "meets_target": None if target is None else rate >= target,
                "all_stored": all(r["stored"] == r["jobs"] for r in mine),
            }
        )
    data = {
        "machine": machine,
        "server": output.server_info(args.server_url),
        "summary": summary,
        "runs": runs,
    }
    md = [
        f"Enqueue rate from one process (median of {args.repeat} runs, fresh database each).",
        "",
        output.table(
            ["mode", "jobs per run", "jobs/s (median)", "best", "target", "meets"],
            [
                (
                    s["description"],
                    s["jobs_per_run"],
                    s["median_rate_per_s"],
                    s["best_rate_per_s"],
                    f">= {s['target_per_s']:,}" if s["target_per_s"] else "-",
                    {None: "-", True: "yes", False: "**no**"}[s["meets_target"]],
                )
                for s in summary
            ],
        ),
    ]

    def chart(path: Path) -> None:
        plt = output.pyplot()
        fig, ax = plt.subplots(figsize=(7, 3.2))
        labels = [s["mode"] for s in summary]
        ax.barh(labels, [s["median_rate_per_s"] for s in summary], color="#4c72b0")
        ax.set_xscale("log")
        ax.set_xlabel("jobs/s (log scale)")
        ax.set_title("Enqueue rate, one producer process")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    output.write_results(NAME, args, data, "\n".join(md), chart)
    return 0 if all(s["all_stored"] for s in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
