"""Job events on the wire: the ``Event`` record, its server-sent-event frame, and the
``Last-Event-ID`` formats a client resumes with.

A job stream's ids are the job's event ``seq``; the firehose's are ``XID-ID`` (the
writing transaction's id and the event's row id), or ``XID-ID-N`` for the ``enqueued``
event of the Nth job of an enqueue record (``firehose_after`` in ``sql/queries.sql``).
All are database positions, so a client may resume on any replica.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MAX_SEQ = 2**31 - 1  # job_events.seq is an integer
SEP = "\r\n"  # the line separator of the SSE frames
_FIREHOSE_ID = re.compile(r"^(\d{1,20})-(\d{1,20})(?:-(\d{1,10}))?$")
_MAX_XID = 2**64 - 1  # xid8 is unsigned 64-bit
_MAX_ID = 2**63 - 1  # job_events.id is a bigint


@dataclass(frozen=True, slots=True)
class Event:
    """One stored job event, as the streams send it."""

    job_id: int
    seq: int
    type: str
    queue: str
    kind: str
    data: Any
    at: str
    xid: int = 0
    id: int = 0
    sub: int = 0  # the job's place in an enqueue record (firehose); 0 for an event row
    _frames: dict[bool, bytes] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Event:
        return cls(
            job_id=row["job_id"],
            seq=row["seq"],
            type=row["type"],
            queue=row["queue"],
            kind=row["kind"],
            data=row["data"],
            at=row["at"].isoformat(),
            xid=int(row.get("xid") or 0),
            id=int(row.get("id") or 0),
            sub=int(row.get("sub") or 0),
        )

    def payload(self) -> dict[str, Any]:
        """The event's JSON (the `data:` of its SSE frame)."""
        return {
            "job_id": self.job_id,
            "seq": self.seq,
            "type": self.type,
            "queue": self.queue,
            "kind": self.kind,
            "at": self.at,
            "data": self.data,
        }

    @property
    def position(self) -> tuple[int, int, int]:
        """Where the event stands in the firehose."""
        return (self.xid, self.id, self.sub)

    @property
    def firehose_id(self) -> str:
        return f"{self.xid}-{self.id}-{self.sub}" if self.sub else f"{self.xid}-{self.id}"

    def frame(self, firehose: bool) -> bytes:
        """The event as an SSE frame, encoded once however many streams send it (the
        hub hands one ``Event`` to every subscriber of its job)."""
        cached = self._frames.get(firehose)
        if cached is None:
            # Compact JSON has no line breaks, so the data fits one `data:` line.
            data = json.dumps(self.payload(), separators=(",", ":"), default=str)
            eid = self.firehose_id if firehose else str(self.seq)
            cached = f"id: {eid}{SEP}event: {self.type}{SEP}data: {data}{SEP}{SEP}".encode()
            self._frames[firehose] = cached
        return cached


def parse_firehose_id(value: str) -> tuple[int, int, int]:
    """Parse a firehose ``Last-Event-ID`` (``XID-ID`` or ``XID-ID-N``) into a position;
    ValueError when malformed."""
    m = _FIREHOSE_ID.match(value.strip())
    sub = int(m[3]) if m and m[3] else 0
    if not m or int(m[1]) > _MAX_XID or int(m[2]) > _MAX_ID or sub > MAX_SEQ:
        raise ValueError("expected XID-ID as sent in the stream's id: field")
    return int(m[1]), int(m[2]), sub


def parse_seq(value: str) -> int:
    """Parse a job stream's ``Last-Event-ID`` (a seq); ValueError when malformed."""
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 10 or int(text) > MAX_SEQ:
        raise ValueError(f"expected the seq number of one of the job's events (0..{MAX_SEQ})")
    return int(text)
