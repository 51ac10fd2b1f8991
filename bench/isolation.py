"""Isolation: web latency at load R with and without the worker tier draining a backlog.

One web replica takes open-loop load R (half its measured capacity unless ``--rate``)
three times: without workers, while worker replicas drain a large backlog of no-op jobs
at full speed, and without workers again (so drift of a shared machine shows). The
backlog is sized to outlast the loaded phase; the result says if it ran out.
``--worker-cpu-quota`` puts each worker replica under a CPU quota, as a pod limit would.
``--mix app`` hosts the example application (``examples/reports``) on the web replica and
requests its database-backed routes (10 % ``POST /reports``, 70 % ``GET /reports/{id}``,
20 % ``GET /reports``); the worker tier then runs the example's jobs and the backlog is
``build_report`` jobs (5 progress events and an ``UPDATE`` of the report row each),
which the workers drain beside the jobs ``POST /reports`` enqueues.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench import command, cpuquota, example, jobs, launch, output, webload
from tierline.testing.databases import dbname
from tierline.testing.ports import free_port

NAME = "isolation"


def main(argv: list[str] | None = None) -> int:
    p = command.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    p.add_argument("--rate", type=float, default=None, help="R in requests/s (default C/2).")
    p.add_argument("--duration", type=float, default=10.0, help="Measured seconds per phase.")
    p.add_argument("--capacity-duration", type=float, default=5.0, help="Seconds (closed loop).")
    p.add_argument("--connections", type=int, default=64, help="Generator connections.")
    p.add_argument(
        "--backlog",
        type=int,
        default=150_000,
        help="Jobs to drain: no-op ones, or the example's build_report with --mix app.",
    )
    p.add_argument("--workers", type=int, default=1, help="Worker replicas draining.")
    p.add_argument("--concurrency", type=int, default=500, help="Slots per worker replica.")
    p.add_argument(
        "--worker-cpu-quota", type=float, default=None, help="CPU cores per worker (quota)."
    )
    p.add_argument(
        "--web-cpu-quota",
        type=float,
        default=None,
        help="CPU cores of the web replica (quota): both tiers limited, as on separate nodes.",
    )
    p.add_argument("--reads", type=int, default=2000, help="Jobs (or reports) seeded for GET.")
    webload.add_mix_option(p)
    args = p.parse_args(argv)
    webload.settle_mix(args)
    quota = cpuquota.CpuQuota(NAME)
    if (args.web_cpu_quota or args.worker_cpu_quota) and not quota.available:
        p.error(f"CPU quotas: {quota.reason}")
    app_mix = args.mix == "app"
    backlog_queue = example.BACKLOG_QUEUE if app_mix else "default"
    if args.smoke:
        args.duration, args.capacity_duration, args.backlog = 1.0, 1.0, 2000
        args.reads, args.connections, args.concurrency = 50, 8, 50
    machine = output.machine()
    phases: list[dict[str, Any]] = []
    capacity: dict[str, Any] | None = None
    drained: dict[str, Any] = {}
    try:
        with jobs.fresh_database(args.server_url) as url, launch.log_folder(NAME) as logs:
            ids = webload.seed_for_reads(url, args.reads, args.mix)
            if app_mix:
                asyncio.run(example.seed_backlog(url, args.backlog))
            else:
                asyncio.run(jobs.seed(url, "noop", {}, args.backlog, held=True))
            port = free_port()
            with launch.processes() as procs:
                web_group = quota.group("web", args.web_cpu_quota) if args.web_cpu_quota else None
                webs = webload.start_web(
                    args, url, logs, procs, 1, port, "iso", mix=args.mix, cgroups=[web_group]
                )
                unit = args.rate
                if unit is None:
                    capacity = webload.loadgen(
                        port,
                        rate=None,
                        duration=args.capacity_duration,
                        ids=ids,
                        warmup=0.3 if args.smoke else 1.0,
                        connections=16,
                        mix=args.mix,
                    )
                    unit = max(10.0, round(capacity["achieved_rps"] / 2))
                    command.say(f"capacity of one replica: {capacity['achieved_rps']} req/s")

                def phase(label: str) -> None:
                    r = webload.costed(
                        args.server_url,
                        dbname(url),
                        [web_group],
                        lambda: webload.loadgen(
                            port,
                            rate=unit,
                            duration=args.duration,
                            ids=ids,
                            warmup=0.3 if args.smoke else 1.0,
                            connections=args.connections,
                            mix=args.mix,
                        ),
                        pids=[w.pid for w in webs],
                    )
                    r["phase"] = label
                    phases.append(r)
                    lat = r["latency_ms"]
                    command.say(
                        f"{label}: p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
                        f"p99.9 {lat['p99_9']} ms, errors {r['errors']}"
                    )

                phase("without workers")
                workers = []
                # The app mix: the example's jobs, the backlog's queue and POST /reports's.
                hosted = (
                    {**example.ENV, "TIERLINE_WORKER_QUEUES": f"default,{backlog_queue}"}
                    if app_mix
                    else {}
                )
                for i in range(args.workers):
                    mport = free_port()
                    group = (
                        quota.group(f"w{i}", args.worker_cpu_quota)
                        if args.worker_cpu_quota
                        else None
                    )
                    w = launch.tierline(
                        "worker",
                        url,
                        logs,
                        f"worker-{i}",
                        log_level=args.log_level,
                        cgroup=group,
                        TIERLINE_WORKER_CONCURRENCY=args.concurrency,
                        TIERLINE_WORKER_METRICS_PORT=mport,
                        TIERLINE_WORKER_SHUTDOWN_GRACE_S=2,
                        **hosted,
                    )
                    procs.append(w)
                    workers.append((w, mport))
                for w, mport in workers:
                    launch.wait_ready(f"http://127.0.0.1:{mport}", w)
                released_at = jobs.release(url, backlog_queue)
                t0 = time.monotonic()
                phase("while workers drain the backlog")
                loaded_s = time.monotonic() - t0
                left = jobs.unfinished(url, backlog_queue)
                # The app mix: the jobs POST /reports enqueued, run beside the backlog.
                beside = example.finished_since(url, "default", released_at) if app_mix else 0
                for w, _ in workers:
                    w.close(timeout=30)
                done = args.backlog - left
                drained = {
                    "jobs_finished_during_phase": done,
                    "jobs_left": left,
                    "backlog_ran_out": left == 0,
                    "drain_rate_per_s": round(done / loaded_s, 1),
                }
                if app_mix:
                    drained["post_reports_jobs_finished_during_phase"] = beside
                command.say(
                    f"workers drained {done} jobs ({drained['drain_rate_per_s']}/s); {left} left"
                    + (f"; and finished {beside} jobs of POST /reports" if app_mix else "")
                )
                phase("without workers (again)")
    finally:
        quota.cleanup()
    without = [x for x in phases if x["phase"].startswith("without")]
    with_ = next(x for x in phases if x["phase"].startswith("while"))
    base_p99 = sum(x["latency_ms"]["p99"] for x in without) / len(without)
    ratio = with_["latency_ms"]["p99"] / base_p99 if base_p99 else None
    verdict = {
        "p99_without_ms": round(base_p99, 3),
        "p99_with_ms": with_["latency_ms"]["p99"],
        "ratio": None if ratio is None else round(ratio, 3),
        "target_ratio": 1.25,
        "meets": ratio is not None and ratio <= 1.25 and with_["errors"] == 0,
    }
    data = {
        "machine": machine,
        "server": output.server_info(args.server_url),
        "unit_load_rps": unit,
        "capacity_one_replica": capacity
        and {k: capacity[k] for k in ("achieved_rps", "latency_ms", "errors")},
        "workers": {
            "replicas": args.workers,
            "concurrency": args.concurrency,
            "cpu_quota_cores": args.worker_cpu_quota if quota.available else None,
            "backlog": args.backlog,
            **drained,
        },
        "web_cpu_quota_cores": args.web_cpu_quota if quota.available else None,
        "phases": phases,
        "target": verdict,
    }
    data["mix"] = webload.MIXES[args.mix]
    data["mix_name"] = args.mix
    if app_mix:
        data["workers"]["backlog_job"] = {"kind": "build_report", "args": example.BACKLOG_ARGS}
    quota_text = (
        f", each under a CPU quota of {args.worker_cpu_quota:g} cores"
        if args.worker_cpu_quota and quota.available
        else ""
    )
    mix_text = (
        f"mix {webload.MIX}"
        if not app_mix
        else f"mix app, the example application's routes (examples/reports hosted by the web "
        f"tier): {webload.MIX_TEXT['app']}, weights {webload.MIXES['app']}"
    )
    backlog_text = (
        "no-op jobs"
        if not app_mix
        else "build_report jobs of the example (5 progress events and an UPDATE of the "
        "report row each, no sleep; the jobs POST /reports enqueues, 5 x 0.1 s of sleep "
        f"each, run beside them: {drained.get('post_reports_jobs_finished_during_phase', 0):,} "
        "finished during the phase)"
    )
    web_quota = (
        f" under a CPU quota of {args.web_cpu_quota:g} cores"
        if args.web_cpu_quota and quota.available
        else ""
    )
    md = [
        f"One web replica{web_quota} at R = {unit:g} req/s (open loop, {mix_text}); worker tier: "
        f"{args.workers} replica(s) x concurrency {args.concurrency}{quota_text}, draining "
        f"{args.backlog:,} {backlog_text} ({drained.get('drain_rate_per_s', 'n/a')} jobs/s "
        f"during the phase, backlog "
        f"{'ran out' if drained.get('backlog_ran_out') else 'lasted'}).",
        "",
        output.table(
            ["phase", "achieved req/s", *webload.RESULT_COLUMNS],
            [(x["phase"], x["achieved_rps"], *webload.result_cells(x)) for x in phases],
        ),
        "",
        f"Target: p99 with the backlog <= 1.25 x without (mean of both): "
        f"{verdict['p99_with_ms']} ms vs {verdict['p99_without_ms']} ms = {verdict['ratio']}x: "
        + ("met." if verdict["meets"] else "**not met**."),
    ]
    if app_mix:
        md += [
            "",
            "By route:",
            "",
            webload.by_op_table([(x["phase"], x) for x in phases], args.mix),
        ]

    def chart(path: Path) -> None:
        plt = output.pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        keys = ["p50", "p90", "p99", "p99_9"]
        width = 0.8 / len(phases)
        for i, x in enumerate(phases):
            ax.bar(
                [k + i * width for k in range(len(keys))],
                [x["latency_ms"][k] for k in keys],
                width,
                label=x["phase"],
            )
        ax.set_xticks([k + width * (len(phases) - 1) / 2 for k in range(len(keys))])
        ax.set_xticklabels(["p50", "p90", "p99", "p99.9"])
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title(
            f"Web latency at {unit:g} req/s, with and without draining workers"
            + (", example app routes" if app_mix else "")
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    output.write_results(NAME, args, data, "\n".join(md), chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
