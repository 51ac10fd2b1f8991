"""``tierline up``: both tiers as separate OS processes on one machine.

Starts the database (embedded unless a URL is given), migrates, runs N web replicas
and M worker replicas, restarts a replica that crashes, scales either tier on request
(``tierline scale``, over a Unix socket in the data folder) without touching the other,
and stops everything cleanly on Ctrl+C.

The web replicas share one listening socket that the supervisor opens and passes down
(the pre-fork model): connections wait in its one accept queue until some replica takes
them, so a replica that stops (scaled in, restarted) strands none. Separate sockets with
``SO_REUSEPORT`` would each have their own queue, and the kernel resets what is queued on
a socket when it closes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierline.errors import ListenError
from tierline.lifecycle import listen_socket
from tierline.logs import get_logger
from tierline.settings import Settings, env_name

log = get_logger(__name__)

TIERS = ("web", "worker")
CONTROL_SOCKET = "control.sock"
MAX_REPLICAS = 64  # per tier on one machine


@dataclass
class Child:
    tier: str
    slot: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    stopping: bool = False


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        env: dict[str, str],
        *,
        web: int,
        workers: int,
        embedded_url: str | None = None,
    ) -> None:
        """``embedded_url``: the embedded server this ``tierline up`` started; other
        commands run in the same data folder join it (``status``)."""
        self.settings = settings
        self.embedded_url = embedded_url
        self.env = env
        self.want = {"web": web, "worker": workers}
        self.children: dict[tuple[str, int], Child] = {}
        self.restart_at: dict[tuple[str, int], float] = {}
        self.crashes: dict[tuple[str, int], int] = {}
        self.stop = asyncio.Event()
        self.data_dir = Path(settings.data_dir).resolve()
        self.listener: socket.socket | None = None  # the web tier's, shared by its replicas

    def web_socket(self) -> socket.socket:
        """The web tier's listening socket, opened on first use (``ListenError`` names
        ``TIERLINE_WEB_PORT`` when the port is taken)."""
        if self.listener is None:
            self.listener = listen_socket(
                self.settings.web_host, self.settings.web_port, setting=env_name("web_port")
            )
        return self.listener

    def _close_web_socket(self) -> None:
        """Scaled to zero web replicas: refuse connections instead of queueing them."""
        if self.listener is not None and not any(c.tier == "web" for c in self.children.values()):
            self.listener.close()
            self.listener = None

    # -- processes --------------------------------------------------------------------------
    def _spawn(self, tier: str, slot: int) -> Child:
        env = dict(self.env)
        args = [sys.executable, "-m", "tierline", tier]
        fds: tuple[int, ...] = ()
        if tier == "web":
            fds = (self.web_socket().fileno(),)
            args += ["--fd", str(fds[0])]
        else:
            base = self.settings.worker_metrics_port
            env["TIERLINE_WORKER_METRICS_PORT"] = str(base + slot if base else 0)
        proc = subprocess.Popen(args, env=env, start_new_session=True, pass_fds=fds)
        child = Child(tier, slot, proc, restarts=self.crashes.get((tier, slot), 0))
        self.children[(tier, slot)] = child
        log.info("replica started", tier=tier, slot=slot, pid=proc.pid)
        return child

    def _terminate(self, child: Child) -> None:
        if child.proc.poll() is None and not child.stopping:
            child.stopping = True
            child.proc.send_signal(signal.SIGTERM)

    async def reconcile(self) -> None:
        """Start missing replicas, stop surplus ones, restart crashed ones (with backoff)."""
        now = time.monotonic()
        for key, child in list(self.children.items()):
            code = child.proc.poll()
            if code is None:
                continue
            del self.children[key]
            tier, slot = key
            if child.stopping or slot >= self.want[tier]:
                log.info(
                    "replica stopped", tier=tier, slot=slot, pid=child.proc.pid, exit_code=code
                )
                continue
            n = self.crashes.get(key, 0) + 1
            self.crashes[key] = n if now - child.started < 60 else 1
            delay = min(30.0, 0.5 * 2 ** (self.crashes[key] - 1))
            self.restart_at[key] = now + delay
            log.warning(
                "replica exited unexpectedly; restarting",
                tier=tier,
                slot=slot,
                pid=child.proc.pid,
                exit_code=code,
                restart_in_s=delay,
            )
        for tier in TIERS:
            for slot in range(self.want[tier]):
                key = (tier, slot)
                if key not in self.children and self.restart_at.get(key, 0) <= now:
                    try:
                        self._spawn(tier, slot)
                    except ListenError as exc:  # scaled up from 0 onto a port now taken
                        log.error("cannot start replica; retrying", tier=tier, error=str(exc))
                        self.restart_at[key] = now + 5.0
            for (t, slot), child in list(self.children.items()):
                if t == tier and slot >= self.want[tier]:
                    self._terminate(child)
        if self.want["web"] == 0:
            self._close_web_socket()

    @staticmethod
    def invalid(tier: str, n: int) -> str | None:
        """Why ``tier=n`` cannot be applied, or None."""
        if tier not in TIERS or n < 0 or n > MAX_REPLICAS:
            return f"expected web=N or worker=N with N in 0..{MAX_REPLICAS}, got {tier}={n}"
        return None

    def scale(self, tier: str, n: int) -> dict[str, Any]:
        """Set a tier's wanted replica count; ``reconcile`` starts or stops processes."""
        if problem := self.invalid(tier, n):
            return {"error": problem}
        old = self.want[tier]
        self.want[tier] = n
        log.info("scaling", tier=tier, replicas_before=old, replicas=n)
        return {"tier": tier, "from": old, "to": n}

    def status(self) -> dict[str, Any]:
        return {
            "embedded_database_url": self.embedded_url,
            "want": dict(self.want),
            "replicas": [
                {
                    "tier": c.tier,
                    "slot": c.slot,
                    "pid": c.proc.pid,
                    "uptime_s": round(time.monotonic() - c.started, 1),
                }
                for c in sorted(self.children.values(), key=lambda c: (c.tier, c.slot))
            ],
        }

    # -- control socket -----------------------------------------------------------------------
    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            request = json.loads(line or b"{}")
            if "scale" in request:
                changes = {str(tier): int(n) for tier, n in request["scale"].items()}
                # All or nothing: one bad change must not leave the others half applied.
                bad = [problem for t, n in changes.items() if (problem := self.invalid(t, n))]
                if bad:
                    reply: dict[str, Any] = {"results": [{"error": bad[0]}]}
                else:
                    reply = {"results": [self.scale(t, n) for t, n in changes.items()]}
                    await self.reconcile()
            else:
                reply = self.status()
        except (ValueError, TypeError, AttributeError, TimeoutError) as exc:
            reply = {"error": f"bad control request: {exc}"}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
        writer.close()

    # -- main loop ----------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("stopping all replicas; Ctrl+C again forces")
                self.stop.set()
            else:
                for child in self.children.values():
                    child.proc.kill()
                os._exit(1)

        if self.want["web"]:
            self.web_socket()  # a taken port stops `tierline up` here, with one line
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock_path = self.data_dir / CONTROL_SOCKET
        sock_path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._control, path=str(sock_path))
        try:
            while not self.stop.is_set():
                await self.reconcile()
                try:
                    await asyncio.wait_for(self.stop.wait(), timeout=0.5)
                except TimeoutError:
                    pass
        finally:
            server.close()
            sock_path.unlink(missing_ok=True)
            await self._stop_all()
            if self.listener is not None:
                self.listener.close()
        return 0

    async def _stop_all(self) -> None:
        for child in self.children.values():
            self._terminate(child)
        deadline = time.monotonic() + self.settings.worker_shutdown_grace_s + 10
        while time.monotonic() < deadline and any(
            c.proc.poll() is None for c in self.children.values()
        ):
            await asyncio.sleep(0.1)
        for child in self.children.values():
            if child.proc.poll() is None:
                log.warning(
                    "replica did not stop in time; killing", tier=child.tier, pid=child.proc.pid
                )
                child.proc.kill()
                child.proc.wait()
        log.info("all replicas stopped")


async def send_control(data_dir: str, request: dict[str, Any]) -> dict[str, Any]:
    """Talk to a running ``tierline up`` (used by ``tierline scale``)."""
    path = Path(data_dir).resolve() / CONTROL_SOCKET
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(json.dumps(request).encode() + b"\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), timeout=10)
    writer.close()
    result: dict[str, Any] = json.loads(line)
    return result
