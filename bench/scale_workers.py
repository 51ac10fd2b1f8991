"""Worker throughput against replicas: 1, 2, 4, 8 worker processes on one backlog.

Two mixes are measured side by side in one run:

- I/O-bound: demo ``sleep`` jobs of 50 ms, concurrency 16 per replica (ideal: 320 jobs/s
  per replica), replicas unconfined;
- CPU-bound: demo ``cpu`` jobs with a fixed iteration count, each replica in its own
  cgroup with a CFS quota (``--cpu-quota`` cores, like a pod's CPU limit), when this
  machine allows creating cgroups; otherwise unconfined, and the result says so.

For each replica count a fresh database gets a held backlog larger than the window can
drain; the replicas start, become ready, the backlog is released, and throughput is the
number of jobs finished (database clock) in a window after a warm-up. Efficiency is
``throughput(N) / (N x throughput(1))``. Database CPU (the backends serving the
benchmark database, from /proc) and connections (pg_stat_activity) are sampled alongside.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench import command, cpuquota, jobs, launch, output, sampling
from tierline.testing.databases import dbname, query
from tierline.testing.ports import free_port

NAME = "scale-workers"


def cpu_job_seconds(iterations: int) -> float:
    """CPU time of one ``cpu`` job here, unconfined (best of 5)."""
    from tierline.demo import cpu

    best = math.inf
    for _ in range(5):
        t0 = time.process_time()
        cpu(iterations)
        best = min(best, time.process_time() - t0)
    return best


def run_point(
    args: Any, mix: str, n: int, quota: cpuquota.CpuQuota, expected_per_replica: float
) -> dict[str, Any]:
    """Throughput of ``n`` replicas on one mix."""
    if mix == "io":
        kind, job_args, concurrency = "sleep", {"seconds": args.sleep_s}, args.io_concurrency
    else:
        kind, job_args, concurrency = "cpu", {"iterations": args.iterations}, args.cpu_concurrency
    horizon = args.warmup + args.window + 5
    backlog = max(200, math.ceil(n * expected_per_replica * horizon * args.backlog_factor))
    with jobs.fresh_database(args.server_url) as url, launch.log_folder(NAME) as logs:
        asyncio.run(jobs.seed(url, kind, job_args, backlog, held=True))
        groups = []
        with launch.processes() as procs:
            ports = []
            for i in range(n):
                group = quota.group(f"{mix}-{n}-{i}", args.cpu_quota) if mix == "cpu" else None
                groups.append(group)
                port = free_port()
                ports.append(port)
                procs.append(
                    launch.tierline(
                        "worker",
                        url,
                        logs,
                        f"worker-{mix}-{n}-{i}",
                        log_level=args.log_level,
                        cgroup=group,
                        TIERLINE_WORKER_CONCURRENCY=concurrency,
                        TIERLINE_WORKER_METRICS_PORT=port,
                        TIERLINE_WORKER_SHUTDOWN_GRACE_S=2,
                    )
                )
            for proc, port in zip(procs, ports, strict=True):
                launch.wait_ready(f"http://127.0.0.1:{port}", proc, timeout=120)
            sampler = sampling.DbSampler(args.server_url, dbname(url))
            sampler.start()
            cpu0 = sum(sampling.cpu_seconds(p.pid) for p in procs)
            throttled0 = sum(quota.throttled_s(g) for g in groups)
            released = jobs.release(url)
            end = time.monotonic() + args.warmup + args.window
            while time.monotonic() < end:
                time.sleep(0.5)
                sampler.sample()
            replica_cpu = sum(sampling.cpu_seconds(p.pid) for p in procs) - cpu0
            throttled = sum(quota.throttled_s(g) for g in groups) - throttled0
            alive = sum(p.alive() for p in procs)
        a = released + timedelta(seconds=args.warmup)
        b = a + timedelta(seconds=args.window)
        row = query(
            url,
            "SELECT count(*) FILTER (WHERE finished_at >= %(a)s AND finished_at < %(b)s) AS n,"
            " count(*) FILTER (WHERE state IN ('available', 'scheduled', 'retrying')) AS left,"
            " count(*) FILTER (WHERE state = 'failed') AS failed"
            " FROM tierline.jobs",
            {"a": a, "b": b},
        )[0]
    done = int(row["n"])
    throughput = done / args.window
    db_cpu = sampler.cpu_seconds()
    elapsed = args.warmup + args.window
    result = {
        "mix": mix,
        "replicas": n,
        "concurrency_per_replica": concurrency,
        "backlog": backlog,
        "finished_in_window": done,
        "throughput_per_s": round(throughput, 1),
        "backlog_left": int(row["left"]),
        "backlog_ran_out": int(row["left"]) == 0,
        "failed": int(row["failed"]),
        "replicas_alive_at_end": alive,
        "replica_cpu_cores": round(replica_cpu / elapsed, 3),
        "replica_throttled_s": round(throttled, 2),
        "db_cpu_cores": None if db_cpu is None else round(db_cpu / elapsed, 3),
        "db_cpu_ms_per_job": None,
        "db_connections_max": sampler.max_connections(),
    }
    if db_cpu is not None and done:
        # Per job over the whole sampled interval: warm-up and window both drain the backlog.
        total = done * elapsed / args.window
        result["db_cpu_ms_per_job"] = round(db_cpu / total * 1000, 3)
    command.say(
        f"{mix} x{n}: {throughput:,.1f} jobs/s, db CPU {result['db_cpu_cores']} cores, "
        f"{result['db_connections_max']} connections, backlog left {row['left']}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = command.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    p.add_argument(
        "--replicas", default="1,2,4,8", help="Comma-separated replica counts (first: base)."
    )
    p.add_argument("--mixes", default="io,cpu", help="io, cpu or both (comma-separated).")
    p.add_argument("--sleep-s", type=float, default=0.05, help="I/O job duration (s).")
    p.add_argument("--io-concurrency", type=int, default=16, help="Slots per replica, I/O mix.")
    p.add_argument("--iterations", type=int, default=20_000, help="sha256 rounds per cpu job.")
    p.add_argument("--cpu-concurrency", type=int, default=2, help="Slots per replica, CPU mix.")
    p.add_argument(
        "--cpu-quota", type=float, default=0.25, help="CPU cores per replica, CPU mix (quota)."
    )
    p.add_argument("--warmup", type=float, default=3.0, help="Seconds before the window.")
    p.add_argument("--window", type=float, default=10.0, help="Measured seconds.")
    p.add_argument(
        "--backlog-factor", type=float, default=1.5, help="Backlog / expected need (margin)."
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.replicas, args.warmup, args.window = "1,2", 0.5, 1.0
        args.iterations = 2000
    counts = [int(x) for x in args.replicas.split(",") if x]
    mixes = [m for m in args.mixes.split(",") if m]
    machine = output.machine()
    quota = cpuquota.CpuQuota(NAME)
    job_cpu_s = cpu_job_seconds(args.iterations)
    expected = {
        "io": args.io_concurrency / args.sleep_s,
        "cpu": (min(args.cpu_quota, 1.0) if quota.available else 1.0) / job_cpu_s,
    }
    command.say(
        f"cpu job: {job_cpu_s * 1000:.1f} ms CPU; quotas: "
        + ("available" if quota.available else f"UNAVAILABLE ({quota.reason})")
    )
    results: list[dict[str, Any]] = []
    try:
        # Side by side: for each replica count, both mixes, so drift in the machine's load
        # hits both alike.
        for n in counts:
            for mix in mixes:
                results.append(run_point(args, mix, n, quota, expected[mix]))
    finally:
        quota.cleanup()
    for mix in mixes:
        mine = [r for r in results if r["mix"] == mix]
        base = mine[0]["throughput_per_s"] / mine[0]["replicas"] if mine else 0.0
        for r in mine:
            ideal = r["replicas"] * base
            r["efficiency"] = round(r["throughput_per_s"] / ideal, 3) if ideal else None
    targets = {"io": {4: 0.95, 8: 0.85}, "cpu": {4: 0.85}}
    verdicts = []
    for r in results:
        t = targets.get(r["mix"], {}).get(r["replicas"])
        if t is not None and r["efficiency"] is not None:
            verdicts.append(
                {
                    "mix": r["mix"],
                    "replicas": r["replicas"],
                    "efficiency": r["efficiency"],
                    "target": t,
                    "meets": r["efficiency"] >= t,
                }
            )
    data = {
        "machine": machine,
        "server": output.server_info(args.server_url),
        "cpu_quota": {
            "applied": quota.available and "cpu" in mixes,
            "cores_per_replica": args.cpu_quota,
            "cgroup": quota.version or None,
            "reason_unavailable": quota.reason or None,
        },
        "cpu_job_cpu_ms": round(job_cpu_s * 1000, 2),
        "settings": {
            "sleep_s": args.sleep_s,
            "io_concurrency": args.io_concurrency,
            "iterations": args.iterations,
            "cpu_concurrency": args.cpu_concurrency,
            "warmup_s": args.warmup,
            "window_s": args.window,
        },
        "results": results,
        "targets": verdicts,
    }
    quota_text = (
        f"each replica in a cgroup v{quota.version[1:]} with a CPU quota of "
        f"{args.cpu_quota:g} cores"
        if quota.available
        else f"**unconfined** (no CPU quota: {quota.reason})"
    )
    md = [
        f"I/O-bound: `sleep` {args.sleep_s * 1000:g} ms, concurrency {args.io_concurrency} per "
        f"replica (ideal {expected['io']:,.0f} jobs/s per replica). CPU-bound: `cpu` "
        f"{args.iterations:,} iterations ({job_cpu_s * 1000:.1f} ms CPU unconfined), "
        f"concurrency {args.cpu_concurrency}, {quota_text}. Window {args.window:g} s after "
        f"{args.warmup:g} s warm-up.",
        "",
        output.table(
            [
                "mix",
                "replicas",
                "jobs/s",
                "efficiency",
                "replica CPU (cores)",
                "db CPU (cores)",
                "db CPU ms/job",
                "db connections",
                "backlog ran out",
            ],
            [
                (
                    r["mix"],
                    r["replicas"],
                    r["throughput_per_s"],
                    r["efficiency"],
                    r["replica_cpu_cores"],
                    r["db_cpu_cores"] if r["db_cpu_cores"] is not None else "n/a",
                    r["db_cpu_ms_per_job"] if r["db_cpu_ms_per_job"] is not None else "n/a",
                    r["db_connections_max"],
                    "yes" if r["backlog_ran_out"] else "no",
                )
                for r in results
            ],
        ),
        "",
        output.table(
            ["mix", "replicas", "efficiency", "target", "meets"],
            [
                (
                    v["mix"],
                    v["replicas"],
                    v["efficiency"],
                    f">= {v['target']}",
                    "yes" if v["meets"] else "**no**",
                )
                for v in verdicts
            ],
        ),
    ]

    def chart(path: Path) -> None:
        plt = output.pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for mix, color in (("io", "#4c72b0"), ("cpu", "#dd8452")):
            mine = [r for r in results if r["mix"] == mix]
            if not mine:
                continue
            xs = [r["replicas"] for r in mine]
            base = mine[0]["throughput_per_s"] / mine[0]["replicas"]
            axes[0].plot(xs, [r["throughput_per_s"] for r in mine], "o-", color=color, label=mix)
            axes[0].plot(xs, [x * base for x in xs], ":", color=color, alpha=0.6)
            axes[1].plot(xs, [r["efficiency"] for r in mine], "o-", color=color, label=mix)
        axes[0].set_title("throughput (dotted: linear)")
        axes[0].set_xlabel("worker replicas")
        axes[0].set_ylabel("jobs/s")
        axes[0].legend()
        axes[1].set_title("efficiency")
        axes[1].set_xlabel("worker replicas")
        axes[1].set_ylim(0, 1.1)
        axes[1].axhline(0.85, color="#c44e52", ls="--", lw=0.8)
        axes[1].legend()
        for ax in axes:
            ax.set_xticks(counts)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    output.write_results(NAME, args, data, "\n".join(md), chart)
    ok = all(r["replicas_alive_at_end"] == r["replicas"] and not r["failed"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
