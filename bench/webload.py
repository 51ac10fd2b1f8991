"""Web replicas sharing a port and the load generator, for ``web-latency`` and ``isolation``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench import command, cpuquota, example, jobs, launch, output, percentiles, sampling
from tierline.testing.databases import query
from tierline.testing.processes import Proc, plain_env
from tierline.testing.waiting import wait_for

MIX = "enqueue=1,get=7,list=2"
# --mix: the load generator's routes (``bench/loadgen.py --routes``) and their weights.
MIXES = {"jobs": MIX, "app": "create_report=1,get_report=7,list_reports=2"}
MIX_TEXT = {
    "jobs": "10 % POST /v1/jobs, 70 % GET /v1/jobs/{id}, 20 % GET /v1/jobs?limit=20",
    "app": "10 % POST /reports (a row and its build_report job in one transaction), "
    "70 % GET /reports/{id}, 20 % GET /reports (the latest 20)",
}
MIX_HELP = (
    "What the load generator requests. jobs (default): Tierline's job API, "
    + MIX_TEXT["jobs"]
    + ". app: the example application examples/reports hosted by the web replicas "
    "(TIERLINE_WEB_APP=examples.reports.web:api, its table migrated, --reads reports "
    "seeded), its database-backed routes: "
    + MIX_TEXT["app"]
    + " (bench/isolation: the worker tier runs the example's jobs and drains its "
    "build_report jobs); results then go to bench/results/app-mix/ unless --out says "
    "otherwise."
)


def add_mix_option(p: Any) -> None:
    """``--mix jobs|app`` on a benchmark's parser."""
    p.add_argument("--mix", choices=sorted(MIXES), default="jobs", help=MIX_HELP.replace("%", "%%"))


def settle_mix(args: Any) -> None:
    """After parsing: the app mix writes beside the job-API results, not over them."""
    if args.mix == "app" and args.out == command.RESULTS:
        args.out = command.RESULTS / "app-mix"


def ops(mix: str) -> list[str]:
    """The operations of ``mix``, in the order of its weights."""
    return [kv.split("=")[0] for kv in MIXES[mix].split(",")]


def by_op_table(rows: list[tuple[str, dict[str, Any]]], mix: str) -> str:
    """p50 / p99 of each operation: one row per (label, loadgen result)."""
    names = ops(mix)
    headers = ["point"] + [f"{op} {q} ms" for op in names for q in ("p50", "p99")]
    table = []
    for label, r in rows:
        by = r["latency_ms_by_op"]
        table.append(
            [label] + [by.get(op, {}).get(q, float("nan")) for op in names for q in ("p50", "p99")]
        )
    return output.table(headers, table)


# The columns both web benchmarks' tables end with: latency, errors and the two costs.
RESULT_COLUMNS = [
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "errors",
    "db CPU (cores)",
    "web throttled s",
    "web waited for a core s",
    "db waited for a core s",
    "host busy %",
]


def result_cells(r: dict[str, Any]) -> tuple[Any, ...]:
    """The ``RESULT_COLUMNS`` cells of one loadgen result (a point or a phase)."""
    lat = r["latency_ms"]
    return (
        lat["p50"],
        lat["p90"],
        lat["p99"],
        lat["p99_9"],
        r["errors"],
        "n/a" if r.get("db_cpu_cores") is None else r["db_cpu_cores"],
        r.get("web_throttled_s", 0.0),
        r.get("web_runq_s", "n/a"),
        "n/a" if r.get("db_runq_s") is None else r["db_runq_s"],
        "n/a" if r.get("host_busy") is None else round(100 * r["host_busy"]),
    )


def costed(
    server_url: str,
    db: str,
    groups: Sequence[Path | None],
    run: Callable[[], dict[str, Any]],
    pids: Sequence[int] = (),
) -> dict[str, Any]:
    """``run()`` (one loadgen point or phase) with what it cost beside its result:
    ``db_cpu_cores``, the CPU of PostgreSQL's backends serving ``db``;
    ``web_throttled_s``, the seconds the web replicas' ``groups`` waited for their quota;
    ``web_runq_s`` and ``db_runq_s``, the seconds the web replicas (``pids``) and those
    backends were runnable but waited for a core; ``host_busy`` and ``host_steal``, the
    busy and stolen share of the host's cores. Which resource saturated when the latency
    leaves the flat region: a quota (throttled), the host's cores (waits for a core, a
    busy host), or PostgreSQL (its CPU)."""
    sampler = sampling.DbSampler(server_url, db)
    sampler.start()
    host = sampling.HostCpu()
    host.begin()
    throttled0 = sum(cpuquota.CpuQuota.throttled_s(g) for g in groups)
    waited0 = sum(sampling.runq_wait_s(p) for p in pids)
    t0 = time.monotonic()
    r = run()
    elapsed = time.monotonic() - t0
    sampler.sample()
    busy, steal = host.shares()
    db_cpu = sampler.cpu_seconds()
    db_waited = sampler.runq_wait_s()
    r["db_cpu_cores"] = None if db_cpu is None else round(db_cpu / elapsed, 2)
    r["db_runq_s"] = None if db_waited is None else round(db_waited, 2)
    r["web_throttled_s"] = round(
        sum(cpuquota.CpuQuota.throttled_s(g) for g in groups) - throttled0, 2
    )
    r["web_runq_s"] = round(sum(sampling.runq_wait_s(p) for p in pids) - waited0, 2)
    r["host_busy"], r["host_steal"] = round(busy, 3), round(steal, 3)
    return r


def api_prefix(mix: str) -> str:
    """Where Tierline's own API lives on the web replicas of ``mix``."""
    return example.API_PREFIX if mix == "app" else ""


def start_web(
    args: Any,
    url: str,
    logs: Path,
    procs: list[Proc],
    n: int,
    port: int,
    label: str,
    mix: str = "jobs",
    cgroups: Sequence[Path | None] = (),
) -> list[Proc]:
    """``n`` web replicas on one port (``--reuse-port``), all ready; with ``mix="app"``
    hosting the example application. ``cgroups``: one per replica (each its own quota,
    like a pod's limit)."""
    hosted = example.ENV if mix == "app" else {}
    mine = []
    for i in range(n):
        proc = launch.tierline(
            "web",
            url,
            logs,
            f"web-{label}-{i}",
            log_level=args.log_level,
            cgroup=cgroups[i] if i < len(cgroups) else None,
            extra_args=["--reuse-port"],
            TIERLINE_WEB_PORT=port,
            TIERLINE_HEARTBEAT_S=1,
            **hosted,
        )
        procs.append(proc)
        mine.append(proc)
    base = f"http://127.0.0.1:{port}"
    pids = {p.pid for p in mine}

    def all_ready() -> bool:
        for p in mine:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited:\n{p.tail()}")
        try:
            reply = httpx.get(f"{base}{api_prefix(mix)}/v1/cluster", timeout=2)
        except httpx.HTTPError:
            return False
        if reply.status_code != 200:
            return False
        ready = {r["pid"] for r in reply.json()["replicas"] if r["tier"] == "web" and r["ready"]}
        return pids <= ready

    wait_for(all_ready, 120, f"{n} web replicas ready", interval=0.3, tolerate=())
    return mine


def loadgen(
    port: int,
    *,
    rate: float | None,
    duration: float,
    ids: tuple[int, int],
    connections: int = 64,
    warmup: float = 1.0,
    cgroup: Path | None = None,
    mix: str = "jobs",
) -> dict[str, Any]:
    """Run the load generator in its own process; its result with latency percentiles."""
    cmd = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--connections",
        str(connections),
        "--mix",
        MIXES[mix],
        "--routes",
        mix,
        "--ids",
        f"{ids[0]}-{ids[1]}",
    ]
    cmd += ["--closed"] if rate is None else ["--rate", str(rate)]
    preexec = None
    if cgroup is not None:
        procs_file = cgroup / "cgroup.procs"

        def preexec() -> None:
            procs_file.write_text(str(os.getpid()))

    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=plain_env("postgresql://unused"),
        timeout=duration + warmup + 120,
        check=False,
        preexec_fn=preexec,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-3000:]}")
    raw = json.loads(done.stdout)
    every = [x for v in raw["latencies"].values() for x in v]
    ok = len(every)
    errors = sum(raw["errors"].values())
    return {
        "mode": raw["mode"],
        "offered_rps": rate,
        # Answers received within the measured window: what the replicas really served.
        "achieved_rps": round(raw["in_window"] / duration, 1),
        "sent": raw["sent"],
        "ok": ok,
        "errors": errors,
        "error_kinds": raw["errors"],
        "generator_behind_s": raw["generator_behind_s"],
        "latency_ms": percentiles.summary_ms(every),
        "latency_ms_by_op": {op: percentiles.summary_ms(v) for op, v in raw["latencies"].items()},
    }


def seed_for_reads(url: str, n: int, mix: str = "jobs") -> tuple[int, int]:
    """Jobs to GET: ``n`` finished-looking rows in queue ``web-read``; their id range.
    With ``mix="app"``: the example's table, migrated, and ``n`` reports in it."""
    import asyncio

    if mix == "app":
        return example.seed_for_reads(url, n)

    asyncio.run(jobs.seed(url, "noop", {}, n, queue="web-read"))
    row = query(
        url, "SELECT min(id) AS lo, max(id) AS hi FROM tierline.jobs WHERE queue = 'web-read'"
    )[0]
    return int(row["lo"]), int(row["hi"])
