"""Unique jobs: at most one job per key while it waits or runs, or within a period.

The model is River's ``UniqueOpts``: the key is the job's kind and its arguments (all of
them, or the ones named), optionally the queue, and, with a period, the number of the
period the enqueue falls in (by the database's clock, so replicas agree). The database
holds the key in ``tierline.jobs.unique_key`` under a partial unique index over the
jobs in the key's states: a duplicate enqueue inserts nothing and answers the existing
job (``created = false``, HTTP 200), exactly like a repeated idempotency key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

ALL_STATES = ("scheduled", "available", "running", "retrying", "succeeded", "failed", "cancelled")
# Without a period: a job blocks duplicates while it waits or runs.
WAITING_OR_RUNNING = ("scheduled", "available", "retrying", "running")
# With a period: finished successfully counts too (once per period), failed or cancelled
# does not (so a failed run can be enqueued again in the same period).
WITHIN_PERIOD = (*WAITING_OR_RUNNING, "succeeded")


class Unique(BaseModel):
    """How a job is unique. ``Unique()`` (or ``unique=True``): by kind and all arguments,
    while a job with them waits or runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    args: list[str] | None = Field(
        None, max_length=50, description="Only these arguments make the key (default: all)."
    )
    period_s: float | None = Field(
        None,
        gt=0,
        le=366 * 86400,
        description="Unique within each period of this length (seconds, aligned to the "
        "Unix epoch) rather than while a job waits or runs.",
    )
    by_queue: bool = Field(False, description="Jobs in different queues are not duplicates.")
    states: list[str] | None = Field(
        None,
        description="The states in which a job blocks a duplicate. Default: waiting and "
        "running; with a period, succeeded too.",
    )

    @field_validator("states")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            unknown = sorted(set(value) - set(ALL_STATES))
            if unknown:
                raise ValueError(f"unknown state {unknown[0]!r}; states: {', '.join(ALL_STATES)}")
            if not value:
                raise ValueError("give at least one state")
        return value


UniqueOption = bool | Unique | None


def resolve(option: UniqueOption) -> Unique | None:
    """``True`` is ``Unique()``; ``False`` and None are not unique."""
    if option is True:
        return Unique()
    if option is False or option is None:
        return None
    return option


def key_parts(unique: Unique | None, kind: str, queue: str, args: dict[str, Any]) -> dict[str, Any]:
    """What the insert stores: the key (the period's number is appended by the database),
    the period and the states; all None when the job is not unique."""
    if unique is None:
        return {"unique_key": None, "unique_period_s": None, "unique_states": None}
    chosen = args if unique.args is None else {k: args.get(k) for k in sorted(unique.args)}
    material = [kind, queue if unique.by_queue else None, chosen]
    digest = hashlib.sha256(
        json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:40]
    states = unique.states or list(WITHIN_PERIOD if unique.period_s else WAITING_OR_RUNNING)
    return {
        "unique_key": f"{kind}:{digest}",
        "unique_period_s": unique.period_s,
        "unique_states": sorted(set(states)),
    }
