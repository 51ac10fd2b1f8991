"""CPU-bound jobs in one worker replica: the thread executor against the process executor
with 1 and 2 children, side by side in one run, plus the per-job overhead of the process
executor for no-op plain functions.

Each run drains a backlog of ``burn`` jobs (pure Python, the GIL held throughout) with
one worker process and a fresh database; the configurations alternate within each
repetition (and their order reverses on every other one), because the machine is shared
and noisy. The rate is the job count over ``max(finished_at) - min(started_at)``
(database clock). The overhead runs drain ``noop_sync`` jobs one at a time (concurrency
1) in each executor: the difference per job is what a round trip to a child costs.
"Cores used" is the CPU time of the worker and its children per second of a drain: on
a shared machine it says how much of the 2 cores a run really got.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import command, jobs, launch, output, percentiles, sampling
from tierline.testing.databases import query
from tierline.testing.ports import free_port

NAME = "cpu"
APP = "bench.apps:app"
CONFIGS: dict[str, dict[str, Any]] = {
    "thread": {"TIERLINE_WORKER_EXECUTOR": "thread", "TIERLINE_WORKER_CONCURRENCY": 2},
    "process, 1 child": {
        "TIERLINE_WORKER_EXECUTOR": "process",
        "TIERLINE_WORKER_CHILDREN": 1,
        "TIERLINE_WORKER_CONCURRENCY": 1,
    },
    "process, 2 children": {
        "TIERLINE_WORKER_EXECUTOR": "process",
        "TIERLINE_WORKER_CHILDREN": 2,
        "TIERLINE_WORKER_CONCURRENCY": 2,
    },
}
OVERHEAD: dict[str, dict[str, Any]] = {
    "thread": {"TIERLINE_WORKER_EXECUTOR": "thread", "TIERLINE_WORKER_CONCURRENCY": 1},
    "process": {
        "TIERLINE_WORKER_EXECUTOR": "process",
        "TIERLINE_WORKER_CHILDREN": 1,
        "TIERLINE_WORKER_CONCURRENCY": 1,
    },
}


def drain(args: Any, label: str, env: dict[str, Any], kind: str, n: int) -> dict[str, Any]:
    """One worker drains ``n`` held ``kind`` jobs; its rate by the database clock."""
    job_args = {"iterations": args.iterations} if kind == "burn" else {}
    with jobs.fresh_database(args.server_url) as url, launch.log_folder(NAME) as logs:
        asyncio.run(jobs.seed(url, kind, job_args, n, held=True))
        port = free_port()
        with launch.processes() as procs:
            worker = launch.tierline(
                "worker",
                url,
                logs,
                f"worker-{label.replace(' ', '').replace(',', '-')}",
                log_level=args.log_level,
                TIERLINE_APP=APP,
                TIERLINE_WORKER_METRICS_PORT=port,
                **env,
            )
            procs.append(worker)
            launch.wait_ready(f"http://127.0.0.1:{port}", worker)
            if env["TIERLINE_WORKER_EXECUTOR"] == "process":
                _wait_for_children(worker)
            cpu0, t0 = _tree_cpu(worker.pid), time.monotonic()
            jobs.release(url)
            deadline = t0 + args.timeout
            while jobs.unfinished(url) and time.monotonic() < deadline:
                time.sleep(0.05)
            cores_used = (_tree_cpu(worker.pid) - cpu0) / (time.monotonic() - t0)
            handler_ms = _mean_duration_ms(f"http://127.0.0.1:{port}")
        row = query(
            url,
            "SELECT count(*) FILTER (WHERE state = 'succeeded') AS succeeded, "
            "extract(epoch FROM max(finished_at) - min(started_at)) AS span_s "
            "FROM tierline.jobs",
        )[0]
    succeeded, span = int(row["succeeded"]), float(row["span_s"] or 0.0)
    result = {
        "label": label,
        "kind": kind,
        "jobs": n,
        "succeeded": succeeded,
        "complete": succeeded == n,
        "span_s": round(span, 3),
        "rate_per_s": round(succeeded / span, 2) if span > 0 else 0.0,
        "ms_per_job": round(1000 * span / succeeded, 3) if succeeded else None,
        # tierline_job_duration_seconds: from the job's start to its outcome, so the
        # executor's own cost without the claims and acknowledgements around it
        "handler_ms": handler_ms,
        # CPU seconds of the worker and its children per second of the drain: what the
        # shared machine gave this replica (2 children can use 2 only on 2 idle cores)
        "cores_used": round(cores_used, 2),
    }
    command.say(f"{label} ({kind}): {succeeded}/{n} jobs in {span:.2f} s")
    return result


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and of its live children (the process executor's)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    return sampling.cpu_seconds(pid) + sum(sampling.cpu_seconds(c) for c in children)


def _mean_duration_ms(metrics_url: str) -> float | None:
    """The mean of the worker's ``tierline_job_duration_seconds`` (milliseconds)."""
    text = httpx.get(f"{metrics_url}/metrics", timeout=10).text
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "tierline_job_duration_seconds":
            for s in family.samples:
                for key in totals:
                    if s.name.endswith(f"_{key}"):
                        totals[key] += s.value
    return round(1000 * totals["sum"] / totals["count"], 4) if totals["count"] else None


def _wait_for_children(worker: Any, timeout: float = 60) -> None:
    """The children start beside the claim loop; measure once they are ready."""
    deadline = time.monotonic() + timeout
    while "child processes ready" not in worker.output():
        if time.monotonic() > deadline or not worker.alive():
            raise RuntimeError("the worker's children did not start:\n" + worker.tail())
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    p = command.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    p.add_argument("--jobs", type=int, default=120, help="CPU-bound jobs per run.")
    p.add_argument("--iterations", type=int, default=1_000_000, help="Loop iterations of one job.")
    p.add_argument("--noop-jobs", type=int, default=2000, help="No-op jobs per overhead run.")
    p.add_argument("--repeat", type=int, default=3, help="Runs per configuration (median).")
    p.add_argument("--timeout", type=float, default=300, help="Give up a run after (s).")
    args = p.parse_args(argv)
    if args.smoke:
        args.jobs, args.iterations, args.noop_jobs, args.repeat = 8, 10_000, 20, 1
    runs: list[dict[str, Any]] = []
    overhead: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        order = list(CONFIGS) if rep % 2 == 0 else list(reversed(CONFIGS))
        for label in order:
            runs.append({**drain(args, label, CONFIGS[label], "burn", args.jobs), "run": rep + 1})
        for label in OVERHEAD if rep % 2 == 0 else reversed(OVERHEAD):
            result = drain(args, label, OVERHEAD[label], "noop_sync", args.noop_jobs)
            overhead.append({**result, "run": rep + 1})
    data = summarise(args, runs, overhead)
    output.write_results(NAME, args, data, markdown(args, data))
    return 0 if all(r["complete"] for r in runs + overhead) else 1


def summarise(
    args: Any, runs: list[dict[str, Any]], overhead: list[dict[str, Any]]
) -> dict[str, Any]:
    def median(rows: list[dict[str, Any]], key: str) -> float:
        return float(percentiles.median([r[key] or 0.0 for r in rows]))

    cores = {
        label: median([r for r in runs if r["label"] == label], "cores_used") for label in CONFIGS
    }
    summary = {
        label: median([r for r in runs if r["label"] == label], "rate_per_s") for label in CONFIGS
    }
    # Ratios within each repetition (same minute of the same noisy machine), then median.
    ratios = [
        round(two["rate_per_s"] / one["rate_per_s"], 3)
        for rep in {r["run"] for r in runs}
        for two in runs
        if two["run"] == rep and two["label"] == "process, 2 children"
        for one in runs
        if one["run"] == rep and one["label"] == "thread" and one["rate_per_s"]
    ]
    handler_ms = {
        label: median([r for r in overhead if r["label"] == label], "handler_ms")
        for label in OVERHEAD
    }
    per_job = {
        label: median([r for r in overhead if r["label"] == label], "ms_per_job")
        for label in OVERHEAD
    }
    return {
        "machine": output.machine(),
        "server": output.server_info(args.server_url),
        "jobs": args.jobs,
        "iterations": args.iterations,
        "repeat": args.repeat,
        "median_rate_per_s": summary,
        "median_cores_used": cores,
        "process2_over_thread": ratios,
        "median_process2_over_thread": percentiles.median(ratios) if ratios else None,
        "target_ratio": 1.6,
        "noop_ms_per_job": per_job,
        "noop_handler_ms": handler_ms,
        "process_overhead_ms_per_job": round(handler_ms["process"] - handler_ms["thread"], 4),
        "runs": runs,
        "overhead_runs": overhead,
    }


def markdown(args: Any, data: dict[str, Any]) -> str:
    rates = data["median_rate_per_s"]
    machine = data["machine"]
    return "\n".join(
        [
            f"{args.jobs} CPU-bound jobs ({args.iterations:,} loop iterations each, pure "
            f"Python) drained by one worker replica; median of {args.repeat} alternating "
            "runs; machine: "
            f"{machine['cpus']} CPUs, load at start {machine['load_average_at_start']}.",
            "",
            output.table(
                ["executor", "jobs/s (db clock)", "x thread", "cores used"],
                [
                    (
                        label,
                        rate,
                        round(rate / rates["thread"], 2),
                        data["median_cores_used"][label],
                    )
                    for label, rate in rates.items()
                ],
            ),
            "",
            "Cores used: CPU seconds of the worker and its children per second of the drain.",
            "",
            f"process (2 children) / thread, per repetition: {data['process2_over_thread']} "
            f"(median {data['median_process2_over_thread']}; target >= {data['target_ratio']}).",
            "",
            f"No-op plain functions, one at a time ({args.noop_jobs} jobs): the handler's "
            "time (tierline_job_duration_seconds: start to outcome, the executor's own cost) "
            "and the whole cycle (claim, run, acknowledge) per job:",
            "",
            output.table(
                ["executor", "handler ms (mean, median of runs)", "cycle ms per job (median)"],
                [
                    (label, data["noop_handler_ms"][label], data["noop_ms_per_job"][label])
                    for label in data["noop_ms_per_job"]
                ],
            ),
            "",
            "Process executor overhead (handler time, process - thread): "
            f"{data['process_overhead_ms_per_job']} ms per job.",
            "",
            output.table(
                [
                    "configuration",
                    "run",
                    "kind",
                    "jobs",
                    "span s",
                    "jobs/s",
                    "ms/job",
                    "handler ms",
                    "cores used",
                ],
                [
                    (
                        r["label"],
                        r["run"],
                        r["kind"],
                        r["jobs"],
                        r["span_s"],
                        r["rate_per_s"],
                        r["ms_per_job"],
                        r["handler_ms"],
                        r["cores_used"],
                    )
                    for r in data["runs"] + data["overhead_runs"]
                ],
            ),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
