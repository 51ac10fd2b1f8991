"""SSE event latency, and how many streams one web replica sustains.

Each open stream follows its own ``ticker`` job. A ticker reports progress on a fixed
schedule and puts ``time.time()``, taken just before ``ctx.progress()``, in the message;
the client (raw asyncio sockets, so its own cost stays small) takes ``time.time()`` when
the event's chunk arrives. Latency is the difference: the worker's batched write, the
commit and NOTIFY, the web replica's fetch and fan-out, and the socket.

Every step holds N streams open while up to ``--jobs`` jobs together emit ``--rate``
events per second (phases spread evenly); beyond ``--jobs`` streams, streams share jobs,
so the worker tier's load stays the same while the replica holds and feeds more streams.
The first step (1,000 streams, one job each) is the latency figure; the largest N whose
p99 stays within ``--max-p99-ms`` with every event delivered is what one replica
sustains.

The worker application is this module: ``TIERLINE_APP=bench.stream_latency:app``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from bench import command, jobs, launch, output, percentiles, sampling
from tierline.app import App
from tierline.context import JobContext
from tierline.testing.ports import free_port
from tierline.testing.processes import Proc

NAME = "stream-latency"
APP = "bench.stream_latency:app"

app = App("bench-streams")


@app.job(max_attempts=1)
async def ticker(ctx: JobContext, ticks: int, interval: float, start_at: float) -> int:
    """``ticks`` progress events, ``interval`` seconds apart from ``start_at`` (epoch s),
    each carrying the wall-clock time of its ``progress()`` call."""
    for i in range(ticks):
        delay = start_at + i * interval - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        ctx.progress((i + 1) / ticks, f"{time.time():.6f}")
    return ticks


# -- a small SSE client on raw sockets --------------------------------------------------------
@dataclass
class Stream:
    job: int
    latencies: list[float] = field(default_factory=list)
    to_db: list[float] = field(default_factory=list)  # progress() -> its write began
    done: bool = False
    error: str = ""


async def open_stream(host: str, port: int, stream: Stream) -> asyncio.StreamReader:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET /v1/jobs/{stream.job}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"job {stream.job}: {status.decode().strip()}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers
    stream_writers.append(writer)
    return reader


stream_writers: list[asyncio.StreamWriter] = []


async def consume(reader: asyncio.StreamReader, stream: Stream) -> None:
    """Read chunked SSE until the job's final event; record progress latencies."""
    buf = b""
    try:
        while not stream.done:
            size_line = await reader.readline()
            if not size_line:
                raise RuntimeError("connection closed before the final event")
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                raise RuntimeError("stream ended before the final event")
            chunk = await reader.readexactly(size + 2)
            now = time.time()
            buf += chunk[:-2]
            while b"\r\n\r\n" in buf:
                block, buf = buf.split(b"\r\n\r\n", 1)
                kind, data = "", b""
                for line in block.split(b"\r\n"):
                    if line.startswith(b"event: "):
                        kind = line[7:].decode()
                    elif line.startswith(b"data: "):
                        data = line[6:]
                if kind == "progress":
                    event = json.loads(data)
                    stamp = float(event["data"]["message"])
                    stream.latencies.append(now - stamp)
                    at = datetime.fromisoformat(event["at"]).timestamp()
                    stream.to_db.append(at - stamp)
                elif kind in ("succeeded", "failed", "cancelled"):
                    stream.done = True
    except Exception as exc:  # reported per stream
        stream.error = f"{type(exc).__name__}: {exc}"


# -- one step ---------------------------------------------------------------------------------
async def run_step(
    url: str,
    web: Proc,
    worker: Proc,
    n: int,
    rate: float,
    window_s: float,
    settle_s: float,
    max_jobs: int,
) -> dict[str, Any]:
    # The producers stay the same from step to step (at most max_jobs jobs emitting `rate`
    # events/s together): beyond max_jobs streams share jobs, so the replica holds more
    # streams and fans more out while the worker tier's load does not change.
    n_jobs = min(n, max_jobs)
    interval = n_jobs / rate
    ticks = max(2, round(window_s / interval))
    host, port = url.removeprefix("http://").rsplit(":", 1)
    # Ticks start once every stream is open; until then the jobs wait, already running.
    start_at = time.time() + settle_s
    jobs: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as api:
        for first in range(0, n_jobs, 1000):
            batch = [
                {
                    "kind": "ticker",
                    "args": {
                        "ticks": ticks,
                        "interval": interval,
                        "start_at": start_at + interval * (i / n_jobs),  # phases spread
                    },
                }
                for i in range(first, min(n_jobs, first + 1000))
            ]
            r = await api.post("/v1/jobs/batch", json={"jobs": batch})
            r.raise_for_status()
            jobs += [j["id"] for j in r.json()["jobs"]]
    streams = [Stream(jobs[i % n_jobs]) for i in range(n)]
    readers: list[asyncio.StreamReader] = []
    opening = time.monotonic()
    for first in range(0, n, 250):  # waves: stay within the listen backlog
        readers += await asyncio.gather(
            *(open_stream(host, int(port), s) for s in streams[first : first + 250])
        )
    open_s = time.monotonic() - opening
    late = time.time() > start_at
    cpu0, wcpu0, wall0 = (
        sampling.cpu_seconds(web.pid),
        sampling.cpu_seconds(worker.pid),
        time.monotonic(),
    )
    ccpu0 = time.process_time()
    waits0 = [cpu_wait_s(p) for p in (web.pid, worker.pid, os.getpid())]  # see pids below
    consumers = [asyncio.create_task(consume(r, s)) for r, s in zip(readers, streams, strict=True)]
    deadline = start_at + ticks * interval + 60
    rss_max = 0
    while not all(c.done() for c in consumers) and time.time() < deadline:
        rss_max = max(rss_max, rss_kib(web.pid))
        await asyncio.sleep(0.5)
    took = time.monotonic() - wall0
    cpu = (sampling.cpu_seconds(web.pid) - cpu0) / took
    worker_cpu = (sampling.cpu_seconds(worker.pid) - wcpu0) / took
    client_cpu = (time.process_time() - ccpu0) / took
    pids = (web.pid, worker.pid, os.getpid())
    waits = [(cpu_wait_s(p) - w0) / took for p, w0 in zip(pids, waits0, strict=True)]
    for c in consumers:
        c.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)
    for w in stream_writers:
        w.close()
    stream_writers.clear()

    latencies = [x for s in streams for x in s.latencies]
    expected = n * ticks
    errors = [s.error for s in streams if s.error]
    return {
        "streams": n,
        "jobs": n_jobs,
        "events_per_s": rate,
        "events_delivered_per_s": round(rate * n / n_jobs),
        "ticks_per_job": ticks,
        "interval_s": round(interval, 3),
        "open_s": round(open_s, 2),
        "opened_late": late,
        "events_expected": expected,
        "events_received": len(latencies),
        "streams_failed": len(errors),
        "first_errors": errors[:3],
        "latency_ms": percentiles.summary_ms(latencies),
        # `at` of an event is the start of the worker's write transaction (database clock):
        # the part spent in the worker before the write, and the rest (write, commit,
        # NOTIFY, the replica's fetch and fan-out, the socket).
        "to_write_ms": percentiles.summary_ms([x for s in streams for x in s.to_db]),
        "write_to_client_ms": percentiles.summary_ms(
            [x - y for s in streams for x, y in zip(s.latencies, s.to_db, strict=True)]
        ),
        "web_cpu_cores": round(cpu, 2),
        "worker_cpu_cores": round(worker_cpu, 2),
        "client_cpu_cores": round(client_cpu, 2),
        # Time runnable but waiting for a core, per second: how busy the machine was.
        "cpu_wait_per_s": {
            "web": round(waits[0], 3),
            "worker": round(waits[1], 3),
            "client": round(waits[2], 3),
        },
        "load_average": output.load_average(),
        "web_rss_mib": round(rss_max / 1024, 1),
    }


def cpu_wait_s(pid: int) -> float:
    """Seconds the process's threads have spent runnable but waiting for a CPU."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return total / 1e9


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def sustained(step: dict[str, Any], max_p99_ms: float) -> bool:
    return (
        step["streams_failed"] == 0
        and step["events_received"] == step["events_expected"]
        and not step["opened_late"]
        and step["latency_ms"]["p99"] <= max_p99_ms
    )


# -- the run ----------------------------------------------------------------------------------
def main() -> None:
    p = command.parser(__doc__.split("\n\n")[0] if __doc__ else NAME)
    p.add_argument(
        "--streams",
        default="1000,2000,4000,8000",
        help="Comma-separated stream counts, one step each; the first is the latency figure.",
    )
    p.add_argument("--rate", type=float, default=1000, help="Events per second, all jobs.")
    p.add_argument(
        "--jobs", type=int, default=1000, help="Most producing jobs; more streams share them."
    )
    p.add_argument("--window", type=float, default=12, help="Seconds of ticking per step.")
    p.add_argument(
        "--max-p99-ms", type=float, default=1000, help="A step is sustained within this p99."
    )
    args = p.parse_args()
    counts = [int(x) for x in args.streams.split(",")]
    if args.smoke:
        counts, args.window = [50, 100], 3
    most = max(counts)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, most * 2 + 1024)  # the replica inherits it: a socket per stream each side
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    steps: list[dict[str, Any]] = []
    with (
        jobs.fresh_database(args.server_url) as db_url,
        launch.log_folder(NAME) as logs,
        launch.processes() as procs,
    ):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        web = launch.tierline(
            "web",
            db_url,
            logs,
            "web",
            log_level=args.log_level,
            TIERLINE_APP=APP,
            TIERLINE_WEB_PORT=port,
            TIERLINE_SSE_MAX_STREAMS=most + 100,
        )
        procs.append(web)
        worker_port = free_port()
        worker = launch.tierline(
            "worker",
            db_url,
            logs,
            "worker",
            log_level=args.log_level,
            TIERLINE_APP=APP,
            TIERLINE_WORKER_METRICS_PORT=worker_port,
            TIERLINE_WORKER_CONCURRENCY=min(10_000, most, args.jobs),
        )
        procs.append(worker)
        launch.wait_ready(url, web)
        launch.wait_ready(f"http://127.0.0.1:{worker_port}", worker)
        for n in counts:
            command.say(f"{n} streams, {args.rate:g} events/s in total")
            step = asyncio.run(
                run_step(
                    url,
                    web,
                    worker,
                    n,
                    args.rate,
                    args.window,
                    settle_s=5 + n / 250,
                    max_jobs=args.jobs,
                )
            )
            step["sustained"] = sustained(step, args.max_p99_ms)
            lat = step["latency_ms"]
            tw, wc = step["to_write_ms"], step["write_to_client_ms"]
            command.say(
                f"  in the worker p50 {tw['p50']:.1f} / p99 {tw['p99']:.1f} ms, then to the "
                f"client p50 {wc['p50']:.1f} / p99 {wc['p99']:.1f} ms"
            )
            command.say(
                f"  p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, p99 {lat['p99']:.1f} ms; "
                f"{step['events_received']}/{step['events_expected']} events, "
                f"{step['streams_failed']} streams failed, CPU: web {step['web_cpu_cores']}, "
                f"worker {step['worker_cpu_cores']}, client {step['client_cpu_cores']} cores; "
                f"waiting for a core per s: {step['cpu_wait_per_s']}"
            )
            steps.append(step)
            if step["streams_failed"] or step["events_received"] < step["events_expected"]:
                break

    first = steps[0]
    ok = [s["streams"] for s in steps if s["sustained"]]
    data = {
        "machine": output.machine(),
        "server": output.server_info(args.server_url),
        "rate_events_per_s": args.rate,
        "max_p99_ms": args.max_p99_ms,
        "latency_streams": first["streams"],
        "latency_ms": first["latency_ms"],
        "target_p99_ms": 50,
        "sustained_streams": max(ok) if ok else 0,
        "steps": steps,
    }
    lat = first["latency_ms"]
    rows = [
        [
            s["streams"],
            s["jobs"],
            s["events_delivered_per_s"],
            f"{s['events_received']:,}/{s['events_expected']:,}",
            s["latency_ms"]["p50"],
            s["latency_ms"]["p90"],
            s["latency_ms"]["p99"],
            s["latency_ms"]["max"],
            s["web_cpu_cores"],
            s["worker_cpu_cores"],
            s["cpu_wait_per_s"]["web"],
            s["web_rss_mib"],
            "yes" if s["sustained"] else "no",
        ]
        for s in steps
    ]
    md = "\n".join(
        [
            f"SSE event latency, `progress()` in the worker to the client's socket, one web "
            f"replica and one worker; {args.jobs:,} jobs (or fewer) emit {args.rate:g} events/s "
            f"in total, and beyond {args.jobs:,} streams several streams follow each job. "
            f"Target: p99 <= 50 ms with 1,000 streams.",
            "",
            f"**{first['streams']:,} streams: p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, "
            f"p99 {lat['p99']:.1f} ms.** One replica sustains "
            f"**{data['sustained_streams']:,} streams** (every event delivered, p99 <= "
            f"{args.max_p99_ms:g} ms).",
            "",
            output.table(
                [
                    "streams",
                    "jobs",
                    "events/s delivered",
                    "events received",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "max ms",
                    "web CPU (cores)",
                    "worker CPU (cores)",
                    "web waited for a core (s/s)",
                    "web RSS MiB",
                    "sustained",
                ],
                rows,
            ),
            "",
            "Client, web replica, worker and PostgreSQL share the machine's cores; the "
            "client reads raw sockets to keep its own share small. *Waited for a core*: time "
            "the web replica's threads were runnable but not running, per second (from "
            "`/proc/PID/task/*/schedstat`); well above its CPU use means the machine, not "
            f"the replica, set the pace. Load average at the end: {output.load_average()}.",
        ]
    )
    output.write_results(NAME, args, data, md)
    if math.isnan(lat["p99"]):
        raise SystemExit("no events measured")


if __name__ == "__main__":
    main()
