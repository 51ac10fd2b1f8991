"""Web latency under open-loop load at 1, 2 and 4 replicas sharing one port.

First the capacity C of one replica is measured (closed loop, the mix below); the unit
load R is C / 2 unless ``--rate`` is given. Then each replica count (1, 2, 4; separate
processes with ``tierline web --reuse-port``, the kernel spreading connections) takes
offered loads R, 2R and 4R from the load generator (``bench/loadgen.py``, its own
process): constant arrival rate, latency from the intended send time. The mix
(``--mix``) is, by default (``jobs``), Tierline's job API: 10 % enqueue
(``POST /v1/jobs``), 70 % get (``GET /v1/jobs/{id}``), 20 % list
(``GET /v1/jobs?limit=20``); ``app`` hosts the example application (``examples/reports``)
on the replicas and requests its database-backed routes instead: 10 % ``POST /reports``
(a row and its job in one transaction), 70 % ``GET /reports/{id}``, 20 % ``GET /reports``.

``--web-cpu-quota Q`` runs each web replica in a cgroup of its own with a CFS quota of Q
cores, like a pod's ``resources.limits.cpu``: then R is half of one *limited* replica's
capacity, and 4 replicas at 4R need 4 x Q cores, not the whole machine.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from bench import command, cpuquota, jobs, launch, output, webload
from tierline.testing.databases import dbname
from tierline.testing.ports import free_port

NAME = "web-latency"


def main(argv: list[str] | None = None) -> int:
    p = command.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    p.add_argument("--replicas", default="1,2,4", help="Comma-separated replica counts.")
    p.add_argument("--loads", default="1,2,4", help="Offered loads as multiples of R.")
    p.add_argument("--rate", type=float, default=None, help="R in requests/s (default C/2).")
    p.add_argument("--duration", type=float, default=10.0, help="Measured seconds per point.")
    p.add_argument("--capacity-duration", type=float, default=5.0, help="Seconds (closed loop).")
    p.add_argument("--connections", type=int, default=64, help="Generator connections.")
    p.add_argument("--reads", type=int, default=2000, help="Jobs (or reports) seeded for GET.")
    p.add_argument(
        "--web-cpu-quota",
        type=float,
        default=None,
        help="CPU cores per web replica (a cgroup each, CFS quota), like a pod's CPU limit.",
    )
    webload.add_mix_option(p)
    args = p.parse_args(argv)
    webload.settle_mix(args)
    if args.smoke:
        args.replicas, args.loads, args.duration, args.capacity_duration = "1,2", "1,2", 1.0, 1.0
        args.reads, args.connections = 50, 8
    counts = [int(x) for x in args.replicas.split(",") if x]
    loads = [float(x) for x in args.loads.split(",") if x]
    machine = output.machine()
    points: list[dict[str, Any]] = []
    quota = cpuquota.CpuQuota(NAME)
    if args.web_cpu_quota and not quota.available:
        p.error(f"--web-cpu-quota: {quota.reason}")
    throttled: dict[str, float] = {}
    try:
        capacity, unit = _run(args, counts, loads, points, quota, throttled)
    finally:
        quota.cleanup()
    return _report(args, machine, counts, loads, points, capacity, unit, throttled)


def _run(
    args: Any,
    counts: list[int],
    loads: list[float],
    points: list[dict[str, Any]],
    quota: cpuquota.CpuQuota,
    throttled: dict[str, float],
) -> tuple[dict[str, Any] | None, float | None]:
    """Every point into ``points``, each replica group's throttled seconds into
    ``throttled``; the closed-loop capacity measured and R."""
    capacity: dict[str, Any] | None = None
    with jobs.fresh_database(args.server_url) as url, launch.log_folder(NAME) as logs:
        ids = webload.seed_for_reads(url, args.reads, args.mix)
        unit = args.rate
        for n in counts:
            port = free_port()
            groups = (
                [quota.group(f"x{n}-{i}", args.web_cpu_quota) for i in range(n)]
                if args.web_cpu_quota
                else []
            )
            with launch.processes() as procs:
                webs = webload.start_web(
                    args, url, logs, procs, n, port, f"x{n}", mix=args.mix, cgroups=groups
                )
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
                for mult in loads:
                    rate = unit * mult
                    r = webload.costed(
                        args.server_url,
                        dbname(url),
                        groups,
                        functools.partial(
                            webload.loadgen,
                            port,
                            rate=rate,
                            duration=args.duration,
                            ids=ids,
                            warmup=0.3 if args.smoke else 1.0,
                            connections=args.connections,
                            mix=args.mix,
                        ),
                        pids=[w.pid for w in webs],
                    )
                    r.update({"replicas": n, "load": f"{mult:g}R"})
                    points.append(r)
                    lat = r["latency_ms"]
                    command.say(
                        f"{n} replicas at {mult:g}R = {rate:g} req/s: p50 {lat['p50']} ms, "
                        f"p99 {lat['p99']} ms, p99.9 {lat['p99_9']} ms, errors {r['errors']}"
                    )
            for i, g in enumerate(groups):
                throttled[f"x{n}-{i}"] = round(quota.throttled_s(g), 2)
    return capacity, unit


def _report(
    args: Any,
    machine: dict[str, Any],
    counts: list[int],
    loads: list[float],
    points: list[dict[str, Any]],
    capacity: dict[str, Any] | None,
    unit: float | None,
    throttled: dict[str, float],
) -> int:
    assert unit is not None
    base = next((x for x in points if x["replicas"] == counts[0] and x["load"] == "1R"), None)
    top = next(
        (x for x in points if x["replicas"] == counts[-1] and x["load"] == f"{loads[-1]:g}R"),
        None,
    )
    verdict: dict[str, Any] = {}
    if base and top:
        ratio = top["latency_ms"]["p99"] / base["latency_ms"]["p99"]
        verdict = {
            "p99_base_ms": base["latency_ms"]["p99"],
            "p99_top_ms": top["latency_ms"]["p99"],
            "ratio": round(ratio, 3),
            "target_ratio": 1.25,
            "errors_at_top": top["errors"],
            "meets": ratio <= 1.25 and top["errors"] == 0,
        }
    data = {
        "machine": machine,
        "server": output.server_info(args.server_url),
        "unit_load_rps": unit,
        "capacity_one_replica": capacity
        and {k: capacity[k] for k in ("achieved_rps", "latency_ms", "errors")},
        "mix": webload.MIXES[args.mix],
        "mix_name": args.mix,
        "connections": args.connections,
        "web_cpu_quota": args.web_cpu_quota,
        "throttled_s": throttled,
        "points": points,
        "target": verdict,
    }
    mix_text = (
        f"Mix {webload.MIX} (weights)"
        if args.mix == "jobs"
        else f"Mix app, the example application's routes (examples/reports hosted by the "
        f"web tier): {webload.MIX_TEXT['app']} (weights {webload.MIXES['app']})"
    )
    limited = (
        f"Each web replica in its own cgroup with a CPU quota of {args.web_cpu_quota:g} cores. "
        if args.web_cpu_quota
        else ""
    )
    md = [
        limited + f"Capacity of one replica (closed loop, 16 connections): "
        f"{capacity['achieved_rps'] if capacity else 'n/a'} req/s; R = {unit:g} req/s. "
        f"{mix_text}, {args.connections} keep-alive connections, "
        f"{args.duration:g} s per point, latency from the intended send time.",
        "",
        output.table(
            ["replicas", "load", "offered req/s", "achieved req/s", *webload.RESULT_COLUMNS],
            [
                (
                    x["replicas"],
                    x["load"],
                    x["offered_rps"],
                    x["achieved_rps"],
                    *webload.result_cells(x),
                )
                for x in points
            ],
        ),
    ]
    if verdict:
        md += [
            "",
            f"Target: p99 at {counts[-1]} replicas and {loads[-1]:g}R <= 1.25 x p99 at "
            f"{counts[0]} replica and R, no errors: {verdict['p99_top_ms']} ms vs "
            f"{verdict['p99_base_ms']} ms = {verdict['ratio']}x, "
            f"{verdict['errors_at_top']} errors: "
            + ("met." if verdict["meets"] else "**not met**."),
        ]
    if args.mix == "app":
        md += [
            "",
            "By route:",
            "",
            webload.by_op_table([(f"{x['replicas']} x {x['load']}", x) for x in points], args.mix),
        ]

    def chart(path: Path) -> None:
        plt = output.pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for n in counts:
            mine = [x for x in points if x["replicas"] == n]
            ax.plot(
                [x["offered_rps"] for x in mine],
                [x["latency_ms"]["p99"] for x in mine],
                "o-",
                label=f"{n} replica{'s' if n > 1 else ''}",
            )
        ax.set_yscale("log")
        ax.set_xlabel("offered load (req/s)")
        ax.set_ylabel("p99 latency (ms, log)")
        ax.set_title(
            "Web p99 latency, open loop" + (", example app routes" if args.mix == "app" else "")
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    output.write_results(NAME, args, data, "\n".join(md), chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
