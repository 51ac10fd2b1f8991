"""Soak: hours of moderate load through both tiers, watching for slow leaks.

Two web and two worker replicas (the demo app) on a fresh database. Client threads
enqueue a mix of jobs (fast, with progress events, sleeping, failing), read jobs, list
them, and follow job streams over SSE, at a fixed moderate rate. Every ``--interval``
seconds the run samples each process's resident memory, open file descriptors and
threads, the database connections by ``application_name``, the queue, and the clients'
counts. At the end the backlog drains and every accepted job is looked up.

Not part of CI (an hour by default): ``bench/soak --duration 300`` validates it.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench import command, jobs, launch, output, percentiles, sampling
from tierline.testing.databases import query
from tierline.testing.ports import free_port
from tierline.testing.processes import Proc
from tierline.testing.waiting import wait_for

NAME = "soak"
FINAL = ("succeeded", "failed", "cancelled")
# What is enqueued, with weights: cheap jobs mostly, some with events, a few failures.
MIX: list[tuple[float, dict[str, Any]]] = [
    (0.55, {"kind": "echo", "args": {"n": 1}}),
    (0.25, {"kind": "progress", "args": {"steps": 5, "delay": 0.05}}),
    (0.15, {"kind": "sleep", "args": {"seconds": 0.2}}),
    (0.05, {"kind": "fail", "args": {"message": "soak"}, "max_attempts": 2}),
]


def parse_args() -> Any:
    p = command.parser(__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3600.0, help="Seconds of load.")
    p.add_argument("--interval", type=float, default=10.0, help="Seconds between samples.")
    p.add_argument("--rate", type=float, default=20.0, help="Enqueues per second.")
    p.add_argument("--reads", type=float, default=20.0, help="Reads per second.")
    p.add_argument("--streams", type=int, default=4, help="Concurrent SSE followers.")
    p.add_argument("--web", type=int, default=2, help="Web replicas.")
    p.add_argument("--workers", type=int, default=2, help="Worker replicas.")
    args = p.parse_args()
    if args.smoke:
        args.duration, args.interval = min(args.duration, 30.0), min(args.interval, 5.0)
    return args


# -- per-process sampling ---------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, float]:
    """Resident memory (MiB), threads and open file descriptors of one process."""
    out = {"rss_mib": 0.0, "threads": 0.0, "fds": 0.0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = float(line.split()[1])
        out["fds"] = float(len(os.listdir(f"/proc/{pid}/fd")))
    except OSError:
        pass
    return out


class Clients:
    """Paced client threads and their counts."""

    def __init__(self, urls: list[str], args: Any) -> None:
        self.urls = urls
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.accepted: dict[str, int] = {}
        self.recent: list[int] = []
        self.streamable: list[int] = []
        self.latency_ms: list[float] = []
        self.threads: list[threading.Thread] = []
        self.rng = random.Random(7)

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def url(self) -> str:
        return self.rng.choice(self.urls)

    def start(self) -> None:
        targets = [self._enqueue, self._enqueue, self._read]
        targets += [self._stream] * self.args.streams
        for i, target in enumerate(targets):
            t = threading.Thread(target=target, args=(i,), daemon=True, name=f"client-{i}")
            t.start()
            self.threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)

    def _paced(self, rate: float, step: Any) -> None:
        interval = 1.0 / rate if rate > 0 else 1.0
        due = time.monotonic()
        with httpx.Client(timeout=15) as client:
            while not self.stop.is_set():
                due += interval
                try:
                    step(client)
                except httpx.HTTPError as exc:
                    self.count(f"transport error {type(exc).__name__}")
                delay = due - time.monotonic()
                if delay > 0:
                    self.stop.wait(delay)
                else:
                    due = time.monotonic()  # behind: do not burst to catch up

    def _enqueue(self, index: int) -> None:
        weights = [w for w, _ in MIX]
        counter = iter(range(10**12))

        def step(client: httpx.Client) -> None:
            (body,) = self.rng.choices([b for _, b in MIX], weights)
            key = f"soak-{index}-{next(counter)}"
            started = time.perf_counter()
            r = client.post(f"{self.url()}/v1/jobs", json={**body, "idempotency_key": key})
            took = (time.perf_counter() - started) * 1000
            self.count(f"enqueue {r.status_code}")
            if r.status_code in (200, 202):
                job_id = int(r.json()["id"])
                with self.lock:
                    self.accepted[key] = job_id
                    self.latency_ms.append(took)
                    self.recent.append(job_id)
                    del self.recent[:-200]
                    if body["kind"] == "progress":
                        self.streamable.append(job_id)
                        del self.streamable[:-50]

        self._paced(self.args.rate / 2, step)

    def _read(self, _: int) -> None:
        def step(client: httpx.Client) -> None:
            with self.lock:
                job_id = self.rng.choice(self.recent) if self.recent else None
            pick = self.rng.random()
            if job_id is not None and pick < 0.7:
                path = f"/v1/jobs/{job_id}"
            elif pick < 0.9:
                path = "/v1/jobs?limit=20"
            else:
                path = "/v1/queues"
            r = client.get(self.url() + path)
            self.count(f"read {r.status_code}")

        self._paced(self.args.reads, step)

    def _stream(self, _: int) -> None:
        timeout = httpx.Timeout(10, read=60)
        with httpx.Client(timeout=timeout) as client:
            while not self.stop.is_set():
                with self.lock:
                    job_id = self.streamable.pop() if self.streamable else None
                if job_id is None:
                    self.stop.wait(0.5)
                    continue
                try:
                    self._follow(client, job_id)
                except httpx.HTTPError as exc:
                    self.count(f"stream error {type(exc).__name__}")

    def _follow(self, client: httpx.Client, job_id: int) -> None:
        with client.stream("GET", f"{self.url()}/v1/jobs/{job_id}/events") as r:
            if r.status_code != 200:
                self.count(f"stream {r.status_code}")
                return
            for line in r.iter_lines():
                if line.startswith("event:"):
                    self.count("stream events")
                    if line.split(":", 1)[1].strip() in FINAL:
                        self.count("streams completed")
                        return
            self.count("streams cut")


def sample(url: str, procs: dict[str, Proc], clients: Clients, t0: float) -> dict[str, Any]:
    conns = query(
        url,
        "SELECT application_name AS name, count(*) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() GROUP BY 1",
    )
    queue = query(url, "SELECT state, count(*) AS n FROM tierline.jobs GROUP BY state")
    with clients.lock:
        counts = dict(clients.counts)
        latencies = sorted(clients.latency_ms)
        clients.latency_ms.clear()
    return {
        "t_s": round(time.monotonic() - t0, 1),
        "processes": {
            name: {**proc_status(p.pid), "cpu_s": round(sampling.cpu_seconds(p.pid), 2)}
            for name, p in procs.items()
        },
        "connections": {r["name"] or "(none)": int(r["n"]) for r in conns},
        "queue": {r["state"]: int(r["n"]) for r in queue},
        "clients": counts,
        "enqueue_ms": percentiles.summary_ms([v / 1000 for v in latencies]) if latencies else {},
    }


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per hour."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / var * 3600


def summarise(samples: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per process: RSS after warm-up vs at the end and the trend of the second half."""
    warm = samples[min(len(samples) - 1, max(1, len(samples) // 10))]
    last = samples[-1]
    half = samples[len(samples) // 2 :]
    out: dict[str, Any] = {}
    for name in names:
        rss = [(s["t_s"], s["processes"][name]["rss_mib"]) for s in half]
        fds = [s["processes"][name]["fds"] for s in samples]
        out[name] = {
            "rss_warm_mib": round(warm["processes"][name]["rss_mib"], 1),
            "rss_end_mib": round(last["processes"][name]["rss_mib"], 1),
            "rss_max_mib": round(max(s["processes"][name]["rss_mib"] for s in samples), 1),
            "rss_trend_mib_per_h_second_half": round(slope_per_hour(rss), 1),
            "fds_min": min(fds),
            "fds_max": max(fds),
            "threads_max": max(s["processes"][name]["threads"] for s in samples),
            "cpu_s": last["processes"][name]["cpu_s"],
        }
    conn_totals = [sum(s["connections"].values()) for s in samples]
    out["connections"] = {"min": min(conn_totals), "max": max(conn_totals)}
    return out


def main() -> int:
    args = parse_args()
    command.say(
        f"soak: {args.duration:.0f} s, {args.web} web + {args.workers} workers, "
        f"{args.rate}/s enqueues, {args.reads}/s reads, {args.streams} streams"
    )
    with (
        jobs.fresh_database(args.server_url) as url,
        launch.log_folder(NAME) as logs,
        launch.processes() as started,
    ):
        procs: dict[str, Proc] = {}
        urls = []
        for i in range(args.web):
            port = free_port()
            p = launch.tierline(
                "web", url, logs, f"web-{i}", log_level=args.log_level, TIERLINE_WEB_PORT=port
            )
            started.append(p)
            procs[f"web-{i}"] = p
            urls.append(f"http://127.0.0.1:{port}")
            launch.wait_ready(urls[-1], p)
        for i in range(args.workers):
            port = free_port()
            p = launch.tierline(
                "worker",
                url,
                logs,
                f"worker-{i}",
                log_level=args.log_level,
                TIERLINE_WORKER_METRICS_PORT=port,
            )
            started.append(p)
            procs[f"worker-{i}"] = p
            launch.wait_ready(f"http://127.0.0.1:{port}", p)
        clients = Clients(urls, args)
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        clients.start()
        next_sample = t0
        while time.monotonic() - t0 < args.duration:
            if time.monotonic() >= next_sample:
                samples.append(sample(url, procs, clients, t0))
                s = samples[-1]
                rss = " ".join(f"{n}={v['rss_mib']:.0f}" for n, v in s["processes"].items())
                command.say(
                    f"t={s['t_s']:.0f}s rss MiB {rss} conns={sum(s['connections'].values())} "
                    f"queue={s['queue']}"
                )
                next_sample += args.interval
            for name, p in procs.items():
                if not p.alive():
                    raise RuntimeError(f"{name} died:\n{p.tail()}")
            time.sleep(0.2)
        clients.join()
        samples.append(sample(url, procs, clients, t0))
        wait_for(
            lambda: (
                not query(
                    url,
                    "SELECT 1 FROM tierline.jobs WHERE state NOT IN "
                    "('succeeded', 'failed', 'cancelled') LIMIT 1",
                )
            ),
            120,
            "the backlog to drain",
            tolerate=(),
        )
        accepted = dict(clients.accepted)
        found = query(
            url,
            "SELECT idempotency_key AS key, state FROM tierline.jobs "
            "WHERE idempotency_key = ANY(%s)",
            (list(accepted),),
        )
        states = Counter(r["state"] for r in found)
        lost = len(accepted) - len(found)
        exit_codes = {}
        for name, p in procs.items():
            p.close(timeout=60)
            exit_codes[name] = p.proc.returncode
    summary = summarise(samples, list(procs))
    data = {
        "duration_s": args.duration,
        "interval_s": args.interval,
        "rate_per_s": args.rate,
        "reads_per_s": args.reads,
        "streams": args.streams,
        "replicas": {"web": args.web, "worker": args.workers},
        "machine": output.machine(),
        "accepted": len(accepted),
        "lost": lost,
        "final_states": dict(states),
        "clients": dict(clients.counts),
        "exit_codes": exit_codes,
        "summary": summary,
        "samples": samples,
    }
    rows = [
        [
            name,
            v["rss_warm_mib"],
            v["rss_end_mib"],
            v["rss_max_mib"],
            v["rss_trend_mib_per_h_second_half"],
            f"{v['fds_min']:.0f}-{v['fds_max']:.0f}",
            v["threads_max"],
            v["cpu_s"],
        ]
        for name, v in summary.items()
        if name != "connections"
    ]
    errors = {k: n for k, n in clients.counts.items() if "error" in k or " 5" in k}
    md = "\n".join(
        [
            f"# Soak: {args.duration:.0f} s through both tiers",
            "",
            f"{args.web} web + {args.workers} worker replicas (demo app), {args.rate:g} "
            f"enqueues/s, {args.reads:g} reads/s, {args.streams} SSE followers; a sample "
            f"every {args.interval:g} s ({len(samples)} samples).",
            "",
            output.table(
                [
                    "process",
                    "RSS after warm-up (MiB)",
                    "RSS at end",
                    "RSS max",
                    "RSS trend, 2nd half (MiB/h)",
                    "fds",
                    "threads max",
                    "CPU s",
                ],
                rows,
            ),
            "",
            f"Database connections (all replicas): {summary['connections']['min']}.."
            f"{summary['connections']['max']}.",
            "",
            f"Jobs accepted: {len(accepted)}; lost: {lost}; final states: {dict(states)}.",
            f"Client errors: {errors or 'none'}; streams completed: "
            f"{clients.counts.get('streams completed', 0)}.",
            f"Exit codes after SIGTERM: {exit_codes}.",
            "",
            "Counts: `" + json.dumps(dict(clients.counts), sort_keys=True) + "`",
        ]
    )
    output.write_results(NAME, args, data, md)
    return 0 if lost == 0 and set(exit_codes.values()) == {0} else 1


if __name__ == "__main__":
    raise SystemExit(main())
