"""Periodic jobs: ``app.schedule(job, cron=..., every_s=...)`` and the scheduler's tick.

A schedule's **slots** are the times its cron expression (cronsim: 5 fields, or 6 with
seconds first, evaluated in the schedule's time zone) or its interval (``every_s``,
aligned to the Unix epoch) names. Each slot gets one job whose idempotency key is
``schedule:NAME:SLOT``: however many workers tick, race or restart, a slot cannot have
two jobs. The tick runs with the rest of the upkeep, one worker at a time
(``maintenance.py``), and enqueues every slot up to ``LOOKAHEAD_S`` ahead with ``run_at``
at the slot, so the job is due on time even though ticks come about once a second.

A slot that has passed without its job (no worker ran for a while) is **missed**: after
downtime, the missed slots make one run at once (``catch_up=True``, the default: the
newest of them) or none; they are never piled up.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from psycopg.types.json import Jsonb

from tierline import enqueue as enqueueing
from tierline.database import Conn
from tierline.enqueue import Registry
from tierline.jobs import KIND_PATTERN, JobRequest
from tierline.logs import get_logger
from tierline.queries import QUERIES

log = get_logger(__name__)

LOOKAHEAD_S = 3.0  # slots are enqueued this far ahead (the tick comes every 0.5-1.5 s)
MAX_SLOTS_PER_TICK = 100  # an interval far shorter than the tick enqueues in chunks


@dataclass(frozen=True)
class Schedule:
    """One periodic job, as the code declares it."""

    name: str
    kind: str
    cron: str | None
    every_s: float | None
    args: dict[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    catch_up: bool = True

    @classmethod
    def make(
        cls,
        kind: str,
        cron: str | None,
        every_s: float | None,
        args: dict[str, Any],
        name: str | None,
        timezone: str,
        catch_up: bool,
    ) -> Schedule:
        import re

        if not kind or not re.match(KIND_PATTERN, kind):
            raise ValueError(f"schedule: {kind!r} is not a job handle or kind")
        if (cron is None) == (every_s is None):
            raise ValueError(f"schedule of {kind!r}: give cron= or every_s=, exactly one")
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"schedule of {kind!r}: unknown time zone {timezone!r}") from None
        if cron is not None:
            if len(cron.split()) not in (5, 6):
                raise ValueError(
                    f"schedule of {kind!r}: cron {cron!r} needs 5 fields "
                    "(minute hour day month weekday), or 6 with seconds first"
                )
            try:
                CronSim(cron, datetime.now(UTC))
            except CronSimError as exc:
                raise ValueError(f"schedule of {kind!r}: cron {cron!r}: {exc}") from None
        if every_s is not None and not (0.5 <= every_s <= 366 * 86400):
            raise ValueError(f"schedule of {kind!r}: every_s must be 0.5 s .. 366 days")
        return cls(name or kind, kind, cron, every_s, dict(args), timezone, catch_up)

    @property
    def spec(self) -> str:
        return f"cron:{self.cron}" if self.cron is not None else f"every:{self.every_s:g}"

    def slots_after(self, after: datetime) -> Iterator[datetime]:
        """The slots strictly after ``after``, in order (UTC)."""
        if self.every_s is not None:
            step = self.every_s
            k = math.floor(after.timestamp() / step) + 1
            while True:
                yield _utc(k * step)
                k += 1
        assert self.cron is not None
        zone = ZoneInfo(self.timezone)
        for slot in CronSim(self.cron, after.astimezone(zone).replace(microsecond=0)):
            if slot > after:
                yield slot.astimezone(UTC)

    def next_after(self, after: datetime) -> datetime:
        return next(self.slots_after(after))

    def key(self, slot: datetime) -> str:
        return f"schedule:{self.name}:{slot.astimezone(UTC).isoformat()}"

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "spec": self.spec,
            "timezone": self.timezone,
            "args": Jsonb(self.args),
            "catch_up": self.catch_up,
        }


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(round(ts, 6), UTC)


def plan(
    schedule: Schedule, last: datetime | None, now: datetime
) -> tuple[list[datetime], datetime]:
    """The slots to enqueue now, and the newest slot handled (enqueued or missed).

    Never run: from now on. Slots before now that were not enqueued ahead were missed:
    the newest of them runs (``catch_up``) or none does. Then every slot up to
    ``LOOKAHEAD_S`` ahead."""
    horizon = now + timedelta(seconds=LOOKAHEAD_S)
    start = last if last is not None else now
    due: list[datetime] = []
    missed: datetime | None = None
    newest = start
    for slot in schedule.slots_after(start):
        if slot > horizon or len(due) >= MAX_SLOTS_PER_TICK:
            break
        newest = slot
        if slot <= now and last is not None:
            missed = slot
            continue
        due.append(slot)
    if missed is not None and schedule.catch_up:
        due.insert(0, missed)
    return due, newest


class Scheduler:
    """Enqueues the schedules' slots; ``tick`` runs inside the upkeep's transaction."""

    def __init__(self, app: Registry, schedules: list[Schedule], max_args_bytes: int) -> None:
        self.app = app
        self.schedules = {s.name: s for s in schedules}
        self.max_args_bytes = max_args_bytes

    async def declare(self, conn: Conn) -> None:
        for s in self.schedules.values():
            await conn.execute(QUERIES["schedule_declare"], s.row())

    async def tick(self, conn: Conn) -> int:
        """Enqueue what is due; the number of jobs enqueued. ``conn`` is in a transaction."""
        if not self.schedules:
            return 0
        rows = await (
            await conn.execute(QUERIES["schedule_rows"], {"names": list(self.schedules)})
        ).fetchall()
        enqueued = 0
        for row in rows:
            schedule = self.schedules[row["name"]]
            try:
                async with conn.transaction():  # a savepoint: one bad schedule, not all
                    enqueued += await self._advance(conn, schedule, row)
            except Exception as exc:
                log.warning("schedule failed", schedule=schedule.name, error=str(exc)[:500])
        return enqueued

    async def _advance(self, conn: Conn, schedule: Schedule, row: dict[str, Any]) -> int:
        slots, newest = plan(schedule, row["last_slot"], row["now"])
        if row["last_slot"] is not None and any(s <= row["now"] for s in slots):
            log.info("schedule catching up after missed slots", schedule=schedule.name)
        job_id, enqueued = None, 0
        for slot in slots:
            request = JobRequest(
                kind=schedule.kind,
                args=schedule.args,
                run_at=slot,
                idempotency_key=schedule.key(slot),
            )
            steps = enqueueing.one(self.app, request, self.max_args_bytes)
            job, created = await enqueueing.on_connection(conn, steps)
            job_id = job.id
            enqueued += int(created)
        if newest != row["last_slot"]:
            await conn.execute(
                QUERIES["schedule_advance"],
                {"name": schedule.name, "last_slot": newest, "last_job_id": job_id},
            )
        return enqueued


def listing(schedules: dict[str, Schedule], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``GET /v1/schedules``: the code's schedules with their stored progress."""
    stored = {r["name"]: r for r in rows}
    now = rows[0]["now"] if rows else datetime.now(UTC)
    out = []
    for name in sorted(set(schedules) | set(stored)):
        s, r = schedules.get(name), stored.get(name, {})
        last = r.get("last_slot")
        out.append(
            {
                "name": name,
                "kind": s.kind if s else r.get("kind"),
                "cron": s.cron if s else None,
                "every_s": s.every_s if s else None,
                "spec": s.spec if s else r.get("spec"),
                "timezone": s.timezone if s else r.get("timezone"),
                "args": s.args if s else r.get("args"),
                "catch_up": s.catch_up if s else r.get("catch_up"),
                "declared": s is not None,
                "last_slot": last.isoformat() if last else None,
                "last_job_id": r.get("last_job_id"),
                "last_job_state": r.get("last_job_state"),
                "next_run": s.next_after(now).isoformat() if s else None,
            }
        )
    return out
