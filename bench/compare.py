"""Tierline beside its peers (pgqueuer, procrastinate): the same workloads, in one run,
alternating, on the same PostgreSQL.

Workloads: drain of no-op jobs by one worker process (handler clock and database-
confirmed), enqueue one at a time (each committed) and in batches of 1,000, 50 ms I/O
jobs at 1, 2 and 4 processes x 16, pickup delay at 50 jobs/s. Every workload of every
round runs each system in a fresh database of its own (its schema installed the way its
documentation says), the systems' order rotating from round to round; the tables give
medians over the rounds and Tierline's ratio to the best peer.

The peers are installed, at the versions pinned in ``bench/peer_settings.py``, into a
venv of the command's own (``bench/.peers-venv``, git-ignored, built on first use with
``python -m venv`` and pip); their runner (``bench/compare_peers.py``) runs there and talks
to them through their public APIs only. ``--tierline-only`` needs no venv (the smoke test).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import command, output, percentiles, report
from bench.compare_tierline import SETTINGS as TIERLINE_SETTINGS
from bench.peer_settings import PINS
from bench.peer_settings import SETTINGS as PEER_SETTINGS
from tierline.testing.databases import query, scratch_database

NAME = "compare"
RUN = uuid.uuid4().hex[:6]  # in the names of the databases this run makes
VENV = command.ROOT / "bench" / ".peers-venv"
PEERS = ("pgqueuer", "procrastinate")
DOC = command.ROOT / "docs" / "benchmarks.md"


# -- the peers' venv ------------------------------------------------------------------------
def peers_python(venv: Path) -> Path:
    """The peers' interpreter, the venv built (or rebuilt, when the pins changed) first."""
    python = venv / "bin" / "python"
    stamp = venv / "pins.txt"
    wanted = "\n".join(PINS) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    command.say(f"building the peers' venv in {venv}: {' '.join(PINS)}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PINS], check=True, timeout=900)
    stamp.write_text(wanted)
    return python


# -- the server -----------------------------------------------------------------------------
@contextlib.contextmanager
def server(args: Any) -> Iterator[str]:
    """The server's admin URL: ``--server-url``, or a private one (``--private-server``)
    with the machine's durability settings and ``pg_stat_statements`` for statements."""
    if not args.private_server:
        yield args.server_url
        return
    from tierline.testing.postgres import PostgresServer, system_bindir

    pg = PostgresServer(
        bindir=system_bindir(),
        fsync="on",
        full_page_writes="on",
        synchronous_commit="on",
        shared_buffers="128MB",
        max_connections=200,
        shared_preload_libraries="pg_stat_statements",
    )
    with pg:
        pg.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        yield pg.url()


# -- one run of one system ------------------------------------------------------------------
def run_one(
    args: Any, admin: str, system: str, workload: str, extra: list[str], peers_py: Path | None
) -> dict[str, Any]:
    if system in ("tierline", "limit"):
        module = "bench.compare_tierline" if system == "tierline" else "bench.limit_sql"
        argv = [sys.executable, "-m", module]
    else:
        assert peers_py is not None
        argv = [str(peers_py), "-m", "bench.compare_peers", system]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERLINE_")}
    env["PYTHONPATH"] = str(command.ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    name = f"tierline_bench_cmp_{RUN}_{system[:4]}_{uuid.uuid4().hex[:8]}"
    logs = Path(tempfile.mkdtemp(prefix=f"tierline-bench-compare-{system}-"))
    with scratch_database(admin, name) as url:
        argv += [workload, "--url", url, "--admin-url", admin, "--logs", str(logs), *extra]
        try:
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=args.timeout + 180
            )
        except subprocess.TimeoutExpired:
            command.say(f"{system} {workload}: timed out; logs in {logs}")
            return {"system": system, "workload": workload, "error": "timeout"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        command.say(f"{system} {workload} failed ({done.returncode}); logs in {logs}")
        command.say(done.stderr[-3000:])
        return {"system": system, "workload": workload, "error": done.stderr[-2000:]}
    for f in logs.iterdir():
        f.unlink()
    logs.rmdir()
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def workload_points(args: Any) -> list[tuple[str, str, list[str]]]:
    """(key, workload, runner arguments) of every point, in the order they run."""
    points: list[tuple[str, str, list[str]]] = []
    timeout = ["--timeout", str(args.timeout)]
    for w in args.workloads:
        if w == "drain":
            points.append(("drain", w, ["--jobs", str(args.drain_jobs), *timeout]))
        elif w == "enqueue_single":
            points.append((w, w, ["--jobs", str(args.single_jobs), *timeout]))
        elif w == "enqueue_batch":
            extra = ["--jobs", str(args.batch_jobs), "--batch", str(args.batch), *timeout]
            points.append((w, w, extra))
        elif w == "io":
            for n in args.io_procs:
                extra = ["--procs", str(n), "--concurrency", "16", "--window"]
                extra += [str(args.io_window), "--warmup", str(args.io_warmup), *timeout]
                points.append((f"io_{n}", w, extra))
        elif w == "pickup":
            extra = ["--jobs", str(args.pickup_jobs), "--rate", str(args.pickup_rate), *timeout]
            points.append(("pickup", w, extra))
    return points


# -- figures --------------------------------------------------------------------------------
METRICS: dict[str, tuple[str, ...]] = {
    "drain": ("handler_rate", "db_rate"),
    "enqueue_single": ("rate",),
    "enqueue_batch": ("rate",),
    "pickup": ("p50", "p99"),
}
HIGHER_IS_BETTER = {"handler_rate": True, "db_rate": True, "rate": True, "pct": True}


def value(run: dict[str, Any], metric: str) -> float | None:
    if "error" in run:
        return None
    if metric in ("p50", "p99"):
        v = run["delay_ms"][metric]
    elif metric == "pct":
        v = run["pct_of_ideal"]
    else:
        v = run.get(metric)
    return None if v is None else float(v)


def medians(runs: list[dict[str, Any]], key: str, system: str) -> dict[str, Any]:
    mine = [r for r in runs if r["key"] == key and r["system"] == system]
    metrics = METRICS.get(key, ("pct",) if key.startswith("io_") else ())
    out: dict[str, Any] = {"runs": len(mine), "failed": sum(1 for r in mine if "error" in r)}
    for m in metrics:
        vals = [v for r in mine if (v := value(r, m)) is not None]
        out[m] = percentiles.median(vals) if vals else None
    for c in ("wal_bytes_per_job", "xacts_per_job", "statements_per_job"):
        vals = [r["cost"][c] for r in mine if "cost" in r and r["cost"][c] is not None]
        out[c] = percentiles.median(vals) if vals else None
    return out


def ratio(tl: float | None, peer: float | None, higher: bool) -> float | None:
    """Tierline relative to the peer, > 1 when Tierline is better (rates: tl / peer;
    latencies: peer / tl)."""
    if tl is None or peer is None or tl == 0 or peer == 0:
        return None
    return tl / peer if higher else peer / tl


LABELS = {
    "drain": "drain {drain_jobs:,} no-op jobs, one worker process: handler clock / "
    "database-confirmed (jobs/s)",
    "enqueue_single": "enqueue one at a time, each committed (jobs/s)",
    "enqueue_batch": "enqueue in batches of {batch:,} (jobs/s)",
    "pickup": "pickup delay at {pickup_rate:g} jobs/s, p50 / p99 (ms)",
}


def label(key: str, args: Any) -> str:
    if key.startswith("io_"):
        return f"50 ms I/O jobs, {key[3:]} process(es) x 16 (% of ideal)"
    return LABELS[key].format(**vars(args))


def fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "n/a"
    if metric in ("p50", "p99"):
        return f"{v:.2f}"
    if metric == "pct":
        return f"{v:.0f} %"
    return f"{v:,.0f}"


def summarize(args: Any, runs: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    keys = list(dict.fromkeys(r["key"] for r in runs))
    summary: dict[str, Any] = {}
    for key in keys:
        per = {s: medians(runs, key, s) for s in systems}
        metrics = METRICS.get(key, ("pct",) if key.startswith("io_") else ())
        ratios: dict[str, Any] = {}
        for m in metrics:
            higher = HIGHER_IS_BETTER.get(m, False)
            peers = [per[s][m] for s in systems if s != "tierline" and per[s][m] is not None]
            best = (max(peers) if higher else min(peers)) if peers else None
            ratios[m] = ratio(per.get("tierline", {}).get(m), best, higher)
        summary[key] = {"label": label(key, args), "systems": per, "tierline_vs_best_peer": ratios}
    return summary


def markdown(args: Any, summary: dict[str, Any], systems: list[str], meta: dict[str, Any]) -> str:
    head = ["workload", *systems, "Tierline vs best peer"]
    rows = []
    for key, s in summary.items():
        metrics = METRICS.get(key, ("pct",) if key.startswith("io_") else ())
        cells = [" / ".join(fmt(s["systems"][x][m], m) for m in metrics) for x in systems]
        rs = s["tierline_vs_best_peer"]
        rcell = " / ".join("n/a" if rs[m] is None else f"{rs[m]:.2f}" for m in metrics)
        rows.append([s["label"], *cells, rcell])
    costs = []
    for s in summary.values():
        for x in systems:
            c = s["systems"][x]
            costs.append(
                [
                    s["label"].split(" (")[0],
                    x,
                    "n/a" if c["wal_bytes_per_job"] is None else f"{c['wal_bytes_per_job']:,.0f}",
                    "n/a" if c["xacts_per_job"] is None else f"{c['xacts_per_job']:.3f}",
                    "n/a" if c["statements_per_job"] is None else f"{c['statements_per_job']:.3f}",
                ]
            )
    settings = ["- **Tierline**: " + "; ".join(f"{k}: {v}" for k, v in TIERLINE_SETTINGS.items())]
    for p in systems:
        if p in PEER_SETTINGS:
            settings.append(
                f"- **{p}**: " + "; ".join(f"{k}: {v}" for k, v in PEER_SETTINGS[p].items())
            )
    where = (
        "a private PostgreSQL 15 (`--private-server`: fsync, full_page_writes and "
        "synchronous_commit on, shared_buffers 128MB, pg_stat_statements)"
        if args.private_server
        else f"the machine's PostgreSQL {meta['server'].get('version', '')}"
    )
    lines = [
        f"`{meta['command']}`, {meta['rounds']} round(s), systems alternating (the order "
        f"rotates each round), medians; on {where}; {meta['machine']['cpus']} CPUs, load "
        f"average {meta['machine']['load_average_at_start']} at the start, "
        f"{output.load_average()} at the end; {meta['started_at']} to {meta['ended_at']} UTC. "
        f"Pins: {', '.join(PINS)}. Ratios: > 1 means Tierline is ahead (rates: Tierline / "
        f"best peer; latencies: best peer / Tierline).",
        "",
        output.table(head, rows),
        "",
        "Cost per job (medians): WAL bytes (`pg_wal_lsn_diff` of `pg_current_wal_lsn()` "
        "around the measured phase: server-wide, so other sessions' writes count on a shared "
        "server), transactions (`pg_stat_database` of the run's database) and statements "
        "(`pg_stat_statements`; n/a without it; one round trip each, but Tierline's claim "
        "and acknowledgement pipeline two statements into one round trip).",
        "",
        output.table(
            ["workload", "system", "WAL bytes/job", "transactions/job", "statements/job"], costs
        ),
        "",
        "Settings:",
        "",
        *settings,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = command.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    p.set_defaults(out=command.RESULTS / NAME)
    p.add_argument("--rounds", type=int, default=3, help="Rounds (medians over them).")
    p.add_argument("--workloads", default="drain,enqueue_single,enqueue_batch,io,pickup")
    p.add_argument("--systems", default="tierline,pgqueuer,procrastinate")
    p.add_argument("--tierline-only", action="store_true", help="No peers (no venv needed).")
    p.add_argument("--drain-jobs", type=int, default=20_000)
    p.add_argument("--single-jobs", type=int, default=2_000)
    p.add_argument("--batch-jobs", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--io-procs", default="1,2,4")
    p.add_argument("--io-window", type=float, default=10.0)
    p.add_argument("--io-warmup", type=float, default=3.0)
    p.add_argument("--pickup-jobs", type=int, default=500)
    p.add_argument("--pickup-rate", type=float, default=50.0)
    p.add_argument("--timeout", type=float, default=300.0, help="Give up a run after (s).")
    p.add_argument("--venv", type=Path, default=VENV, help="The peers' venv.")
    p.add_argument(
        "--private-server",
        action="store_true",
        help="Run on a private PostgreSQL 15 with pg_stat_statements (clean WAL figures).",
    )
    p.add_argument(
        "--doc",
        type=Path,
        default=None,
        help=f"Update its compare block (default {DOC}, not in --smoke).",
    )
    args = p.parse_args(argv)
    if args.doc is not None and not args.doc.is_file():  # said now, not after the run
        p.error(f"--doc {args.doc}: no such file (the page whose compare block to update)")
    if args.smoke:
        args.rounds, args.drain_jobs, args.single_jobs, args.batch_jobs = 1, 200, 30, 300
        args.batch, args.io_procs, args.io_window, args.io_warmup = 100, "1", 1.0, 0.5
        args.pickup_jobs = 10
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.io_procs = [int(x) for x in str(args.io_procs).split(",") if x]
    systems = ["tierline"] if args.tierline_only else args.systems.split(",")
    peers_py = None
    if any(s in PEERS for s in systems):
        try:
            peers_py = peers_python(args.venv)
        except (OSError, subprocess.SubprocessError) as exc:
            command.say(f"cannot build the peers' venv ({exc}); --tierline-only runs without")
            return 2
    meta = run_started(NAME, args.rounds)
    runs: list[dict[str, Any]] = []
    with server(args) as admin:
        meta["server"] = output.server_info(admin)
        for rnd in range(args.rounds):
            for i, (key, workload, extra) in enumerate(workload_points(args)):
                k = (rnd + i) % len(systems)
                for system in systems[k:] + systems[:k]:
                    r = run_one(args, admin, system, workload, extra, peers_py)
                    runs.append({**r, "key": key, "round": rnd + 1})
                    command.say(f"round {rnd + 1} {key} {system}: {brief(r)}")
        leftovers = query(
            admin,
            "SELECT count(*) AS n FROM pg_database WHERE datname LIKE %s",
            (f"tierline_bench_cmp_{RUN}_%",),
        )[0]["n"]  # this run's only: another run's (or a killed one's) are not ours
    run_ended(meta)
    summary = summarize(args, runs, systems)
    data = {
        **meta,
        "private_server": args.private_server,
        "systems": systems,
        "pins": list(PINS),
        "settings": {
            "tierline": TIERLINE_SETTINGS,
            **{s: PEER_SETTINGS[s] for s in systems if s in PEER_SETTINGS},
        },
        "summary": summary,
        "runs": runs,
        "databases_left": int(leftovers),
    }
    md = markdown(args, summary, systems, meta)
    output.write_results(NAME, args, data, md)
    print(md)
    doc = args.doc or (None if args.smoke else DOC)
    if doc is not None:
        names = report.update(doc, args.out, command.ROOT / "docs" / "img")
        command.say(f"updated {doc}: {', '.join(names) or 'no <!-- bench:compare --> block'}")
    return 1 if any("error" in r for r in runs) else 0


def brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return "FAILED"
    keys = ("handler_rate", "db_rate", "rate", "pct_of_ideal")
    got = {k: round(float(r[k]), 1) for k in keys if r.get(k) is not None}
    if "delay_ms" in r:
        got.update({f"delay_{k}": v for k, v in r["delay_ms"].items()})
    return json.dumps(got)


def run_started(name: str, rounds: int) -> dict[str, Any]:
    """A run's metadata at its start: command, machine, time and load (``bench/limit``
    shares it)."""
    return {
        "command": output.command_line(name),
        "rounds": rounds,
        "machine": output.machine(),
        "started_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "uptime": _uptime(),
    }


def run_ended(meta: dict[str, Any]) -> None:
    """Add the end time and load to ``meta``."""
    meta["ended_at"] = datetime.now(UTC).strftime("%H:%M")
    meta["uptime_at_end"] = _uptime()


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
