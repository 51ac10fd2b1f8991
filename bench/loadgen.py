"""An HTTP/1.1 load generator, run as its own process by the web benchmarks.

Open loop (``--rate``): request ``i`` is due at ``start + i / rate`` whatever happened
before it, and its latency is measured from that intended time, so a slow server cannot
slow the generator down and hide its own queueing (no coordinated omission). Requests go
over a fixed pool of keep-alive connections; a request waits for a free connection, and
that wait counts. Closed loop (``--closed``): every connection sends back to back; its
throughput is the capacity.

The operations (``--routes``): ``jobs``, Tierline's job API: ``enqueue``
(``POST /v1/jobs``), ``get`` (``GET /v1/jobs/{id}`` of a seeded job) and ``list``
(``GET /v1/jobs?limit=20``); ``app``, the example application's routes
(``examples/reports``): ``create_report`` (``POST /reports``: a row and its job in one
transaction), ``get_report`` (``GET /reports/{id}`` of a seeded report) and
``list_reports`` (``GET /reports``, the latest 20). ``--mix`` weighs them. The result is
JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

ENQUEUE_BODY = json.dumps({"kind": "noop", "args": {}, "queue": "web"}).encode()
# A small report: its job sleeps 5 x 0.1 s on a worker (examples/reports/jobs.py).
REPORT_BODY = json.dumps({"title": "bench", "rows": 5}).encode()
ROUTES = ("jobs", "app")


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    completed: int = 0
    in_window: int = 0  # answered before the measured window ended (the served rate)

    def ok(self, op: str, latency: float) -> None:
        self.latencies.setdefault(op, []).append(latency)

    def error(self, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1


class Mix:
    """Picks operations by weight and renders their requests."""

    def __init__(
        self,
        host: str,
        weights: dict[str, float],
        ids: tuple[int, int],
        seed: int,
        routes: str = "jobs",
    ):
        self.host = host
        self.routes = routes
        self.ops = list(weights)
        self.weights = [weights[o] for o in self.ops]
        self.ids = ids
        self.rng = random.Random(seed)

    def next(self) -> tuple[str, bytes]:
        op = self.rng.choices(self.ops, self.weights)[0]
        if self.routes == "app":
            return op, self.app_request(op)
        if op == "enqueue":
            head = (
                f"POST /v1/jobs HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(ENQUEUE_BODY)}\r\n\r\n"
            )
            return op, head.encode() + ENQUEUE_BODY
        if op == "get":
            job = self.rng.randint(*self.ids)
            return op, f"GET /v1/jobs/{job} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        return op, f"GET /v1/jobs?limit=20 HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()

    def app_request(self, op: str) -> bytes:
        if op == "create_report":
            head = (
                f"POST /reports HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(REPORT_BODY)}\r\n\r\n"
            )
            return head.encode() + REPORT_BODY
        if op == "get_report":
            report = self.rng.randint(*self.ids)
            return f"GET /reports/{report} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        if op == "list_reports":
            return f"GET /reports HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        raise ValueError(f"unknown operation {op!r} of the app routes")


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = -1
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length > 0:
        await reader.readexactly(length)
    return status


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes, timeout: float) -> int:
        if self.writer is None or self.reader is None:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), timeout
            )
            self.reader, self.writer = reader, writer
        else:
            reader, writer = self.reader, self.writer
        writer.write(data)
        return await asyncio.wait_for(read_response(reader), timeout)

    def reset(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def open_loop(args: argparse.Namespace, mix: Mix, stats: Stats) -> float:
    queue: asyncio.Queue[tuple[float, str, bytes] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    warm_end = start + args.warmup
    window_end = warm_end + args.duration
    total = int(args.rate * (args.warmup + args.duration))

    async def connection_worker() -> None:
        conn = Connection(args.host, args.port)
        while True:
            item = await queue.get()
            if item is None:
                break
            intended, op, data = item
            try:
                status = await conn.request(data, args.timeout)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                conn.reset()
                if intended >= warm_end:
                    stats.error(type(exc).__name__)
                continue
            done = loop.time()
            if intended < warm_end:
                continue
            stats.completed += 1
            if done <= window_end:
                stats.in_window += 1
            if 200 <= status < 300:
                stats.ok(op, done - intended)
            else:
                stats.error(f"http {status}")
        conn.reset()

    workers = [asyncio.create_task(connection_worker()) for _ in range(args.connections)]
    for i in range(total):
        intended = start + i / args.rate
        delay = intended - loop.time()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        op, data = mix.next()
        if intended >= warm_end:
            stats.sent += 1
        queue.put_nowait((intended, op, data))
    behind = loop.time() - (start + (total - 1) / args.rate)
    for _ in workers:
        queue.put_nowait(None)
    # Whatever is still queued or in flight gets a bounded time to finish; the rest are
    # errors (the server did not answer in time).
    _done, pending = await asyncio.wait(workers, timeout=args.timeout + 5)
    for task in pending:
        task.cancel()
    missing = stats.sent - stats.completed - sum(stats.errors.values())
    if missing > 0:
        stats.errors["no answer before the end"] = missing
    return max(0.0, float(behind))


async def closed_loop(args: argparse.Namespace, mix: Mix, stats: Stats) -> float:
    loop = asyncio.get_running_loop()
    warm_end = loop.time() + args.warmup
    end = warm_end + args.duration

    async def client() -> None:
        conn = Connection(args.host, args.port)
        while (now := loop.time()) < end:
            op, data = mix.next()
            try:
                status = await conn.request(data, args.timeout)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                conn.reset()
                stats.error(type(exc).__name__)
                continue
            if now >= warm_end:
                stats.sent += 1
                stats.completed += 1
                stats.in_window += loop.time() <= end
                if 200 <= status < 300:
                    stats.ok(op, loop.time() - now)
                else:
                    stats.error(f"http {status}")
        conn.reset()

    await asyncio.gather(*(client() for _ in range(args.connections)))
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=100.0, help="Requests per second (open loop).")
    p.add_argument("--closed", action="store_true", help="Closed loop: measure capacity.")
    p.add_argument("--duration", type=float, default=10.0, help="Measured seconds.")
    p.add_argument("--warmup", type=float, default=1.0, help="Seconds not measured first.")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--timeout", type=float, default=10.0, help="Per request (s).")
    p.add_argument("--mix", default="enqueue=1,get=7,list=2", help="op=weight,...")
    p.add_argument("--routes", default="jobs", choices=ROUTES, help="Whose routes (above).")
    p.add_argument("--ids", default="1-1000", help="Range of job (or report) ids to GET.")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    weights = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
    lo, hi = (int(x) for x in args.ids.split("-"))
    mix = Mix(f"{args.host}:{args.port}", weights, (lo, hi), args.seed, args.routes)
    stats = Stats()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    t0 = time.perf_counter()
    behind = asyncio.run((closed_loop if args.closed else open_loop)(args, mix, stats))
    out: dict[str, Any] = {
        "mode": "closed" if args.closed else "open",
        "rate": None if args.closed else args.rate,
        "duration_s": args.duration,
        "connections": args.connections,
        "sent": stats.sent,
        "completed": stats.completed,
        "in_window": stats.in_window,
        "errors": stats.errors,
        "generator_behind_s": round(behind, 4),
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "latencies": {op: [round(x, 6) for x in v] for op, v in stats.latencies.items()},
    }
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
