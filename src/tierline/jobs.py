"""What a job is: states, the validated request to enqueue one, and its public view."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tierline.unique import Unique

QUEUE_PATTERN = r"^[A-Za-z0-9_.\-]{1,100}$"
KIND_PATTERN = r"^[A-Za-z0-9_.:\-]{1,200}$"


class State(StrEnum):
    scheduled = "scheduled"
    available = "available"
    running = "running"
    retrying = "retrying"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


# A job in one of these states has finished; its last event has the state as its type.
FINAL_STATES = frozenset({State.succeeded, State.failed, State.cancelled})


class JobRequest(BaseModel):
    """A job to enqueue. Unset options take the handler's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(pattern=KIND_PATTERN, description="Registered job kind.")
    args: dict[str, Any] = Field(default_factory=dict, description="Handler arguments (JSON).")
    queue: str | None = Field(None, pattern=QUEUE_PATTERN)
    priority: int | None = Field(None, ge=-100, le=100, description="Higher runs first.")
    run_at: datetime | None = Field(None, description="Not before this time (ISO 8601).")
    delay_s: float | None = Field(None, ge=0, le=366 * 86400, description="Not before now + this.")
    max_attempts: int | None = Field(None, ge=1, le=1000)
    timeout_s: float | None = Field(None, gt=0, le=7 * 86400)
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=255, description="Enqueue at most once per key."
    )
    unique: bool | Unique | None = Field(
        None,
        description="At most one such job while one waits or runs (true: by kind and all "
        "arguments), or within a period; a duplicate answers the existing job (200). "
        "Default: the handler's.",
    )

    @field_validator("run_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("run_at needs a time zone, e.g. 2030-01-01T00:00:00Z")
        if value is not None:
            # 9999-12-31T23:59-14:00 is year 10000 in UTC: PostgreSQL stores it, but it could
            # never be read back into a datetime (every listing that meets it would fail).
            # A day of margin each side also covers any session time zone.
            try:
                value = value.astimezone(UTC)
            except OverflowError:
                value = None
            if value is None or not 2 <= value.year <= 9998:
                raise ValueError("run_at is out of range (years 2..9998 in UTC)")
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @model_validator(mode="after")
    def _one_time(self) -> JobRequest:
        if self.run_at is not None and self.delay_s is not None:
            raise ValueError("give run_at or delay_s, not both")
        return self


class Job(BaseModel):
    """A job as the API shows it."""

    id: int
    kind: str
    queue: str
    state: State
    args: dict[str, Any]
    priority: int
    attempt: int
    max_attempts: int
    timeout_s: float | None
    idempotency_key: str | None
    run_at: datetime
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: Any = None
    error: Any = None
    progress: dict[str, Any] | None = None
    cancel_requested: bool = False

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        values: dict[str, Any] = {k: row.get(k) for k in cls.model_fields}
        values["cancel_requested"] = row.get("cancel_requested_at") is not None
        # Validated, not ``model_construct``ed: pydantic's validator (Rust) takes 3 us for
        # a job where model_construct (Python) takes 10, and a listing builds hundreds.
        # It also turns the state's text into the enum.
        return cls.model_validate(values)


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON; ValueError for NaN and infinities,
    UnicodeEncodeError for lone surrogates (neither can be stored as JSON)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return len(text.encode())
