"""The job state machine, by property: hypothesis drives random sequences of enqueue,
claim, finish, cancel, retry, lease expiry, renewal, release and promotion through the
real SQL (``tierline.queue.Queue`` and the named worker queries) against a real
PostgreSQL, and compares every step with a small model.

Invariants after every step: the database holds exactly the model's jobs (none lost,
none extra) in the model's state and attempt; only legal transitions happen; leases and
finish times agree with the state; each job's events are numbered 1..n without a gap.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tests.helpers import report
from tests.jobs_app import app
from tierline.errors import InvalidTransition, JobNotFound
from tierline.jobs import JobRequest
from tierline.queries import QUERIES
from tierline.queue import Queue

T = TypeVar("T")

OWNERS = (
    "00000000-0000-0000-0000-00000000000a",
    "00000000-0000-0000-0000-00000000000b",
)
LEASE_S = 300.0
WAITING = {"scheduled", "available", "retrying"}
FINAL = {"succeeded", "failed", "cancelled"}
LEGAL = {
    ("scheduled", "available"),  # promoted when due
    ("scheduled", "running"),
    ("scheduled", "cancelled"),
    ("available", "running"),
    ("available", "cancelled"),
    ("retrying", "available"),
    ("retrying", "running"),
    ("retrying", "cancelled"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("running", "retrying"),
    ("running", "available"),  # lease expired, or handed back on shutdown
    ("succeeded", "available"),  # retried by an operator
    ("failed", "available"),
    ("cancelled", "available"),
}
EXAMPLES = 50
STEPS = 40
MAX_ROUNDS = 5


@dataclass
class Model:
    state: str
    max_attempts: int
    attempt: int = 0
    due: bool = True  # a waiting job whose run_at has come
    owner: str | None = None
    cancel_requested: bool = False
    history: list[str] = field(default_factory=list)


class Env:
    """One event loop, pool and queue for the whole run (one database per test run)."""

    def __init__(self, db_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            db_url,
            min_size=1,
            max_size=2,
            open=False,
            kwargs={"autocommit": True, "row_factory": dict_row},
        )
        self.run(self.pool.open(wait=True, timeout=10))
        self.queue = Queue(app, self.pool)
        self.examples = 0
        self.steps = 0
        self.transitions: dict[tuple[str, str], int] = {}

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def sql(self, query: Any, params: Any = None) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(query, params)
            return await cur.fetchall() if cur.description else []

    def close(self) -> None:
        self.run(self.pool.close())
        self.loop.close()


class JobMachine(RuleBasedStateMachine):
    env: ClassVar[Env]

    def __init__(self) -> None:
        super().__init__()
        self.env.examples += 1
        self.env.run(self.env.sql("TRUNCATE tierline.jobs, tierline.job_events RESTART IDENTITY"))
        self.jobs: dict[int, Model] = {}
        self.keys: dict[str, int] = {}
        self.claimed_by: dict[str, set[int]] = {o: set() for o in OWNERS}

    # -- helpers ------------------------------------------------------------------------------
    def _ids(self, *states: str) -> list[int]:
        return sorted(i for i, m in self.jobs.items() if m.state in states)

    def _pick(self, data: st.DataObject, *states: str) -> int:
        return data.draw(st.sampled_from(self._ids(*states)), label="job")

    def _set(self, job_id: int, state: str) -> None:
        model = self.jobs[job_id]
        if state != model.state:
            model.history.append(state)
        model.state = state
        if state != "running":
            model.owner = None

    def _new(self, job_id: int, delayed: bool, max_attempts: int) -> None:
        assert job_id not in self.jobs, f"job id {job_id} returned twice"
        state = "scheduled" if delayed else "available"
        self.jobs[job_id] = Model(state, max_attempts, due=not delayed, history=[state])

    # -- producers ----------------------------------------------------------------------------
    @rule(delayed=st.booleans(), max_attempts=st.integers(1, 3))
    def enqueue(self, delayed: bool, max_attempts: int) -> None:
        request = JobRequest(
            kind="noop", max_attempts=max_attempts, delay_s=3600 if delayed else None
        )
        job, created = self.env.run(self.env.queue.enqueue(request))
        assert created
        self._new(job.id, delayed, max_attempts)
        assert job.state == self.jobs[job.id].state and job.attempt == 0

    @rule(n=st.integers(1, 4), delayed=st.booleans())
    def enqueue_batch(self, n: int, delayed: bool) -> None:
        requests = [
            JobRequest(kind="noop", max_attempts=2, delay_s=3600 if delayed else None)
            for _ in range(n)
        ]
        results = self.env.run(self.env.queue.enqueue_batch(requests))
        assert len(results) == n and all(created for _, created in results)
        for job, _ in results:
            self._new(job.id, delayed, 2)

    @rule(key=st.sampled_from(["k1", "k2", "k3"]))
    def enqueue_with_key(self, key: str) -> None:
        request = JobRequest(kind="noop", max_attempts=3, idempotency_key=key)
        job, created = self.env.run(self.env.queue.enqueue(request))
        if key in self.keys:
            assert not created and job.id == self.keys[key], "a key enqueued twice"
        else:
            assert created
            self.keys[key] = job.id
            self._new(job.id, False, 3)

    # -- the worker side ------------------------------------------------------------------------
    @rule(owner=st.sampled_from(OWNERS), limit=st.integers(1, 4))
    def claim(self, owner: str, limit: int) -> None:
        rows = self.env.run(
            self.env.sql(
                QUERIES["claim"],
                {
                    "queues": ["default"],
                    "limit": limit,
                    "owner": owner,
                    "lease_s": LEASE_S,
                    "skip": [],
                },
            )
        )
        due = [i for i in self._ids(*WAITING) if self.jobs[i].due]
        assert len(rows) == min(limit, len(due)), (rows, due)
        for row in rows:
            model = self.jobs[row["id"]]
            assert row["id"] in due, f"claimed job {row['id']} in {model.state}, not due"
            model.attempt += 1
            assert row["attempt"] == model.attempt
            self._set(row["id"], "running")
            model.owner = owner
            self.claimed_by[owner].add(row["id"])

    # One rule per outcome: hypothesis spreads its choices over rules more evenly than
    # over the values of one argument.
    @precondition(lambda self: self._ids("running"))
    @rule(data=st.data())
    def finish_success(self, data: st.DataObject) -> None:
        self._finish(self._pick(data, "running"), "success")

    @precondition(lambda self: self._ids("running"))
    @rule(data=st.data())
    def finish_error(self, data: st.DataObject) -> None:
        self._finish(self._pick(data, "running"), "error")

    @precondition(lambda self: self._ids("running"))
    @rule(data=st.data())
    def finish_cancelled(self, data: st.DataObject) -> None:
        self._finish(self._pick(data, "running"), "cancel")

    @precondition(lambda self: self._ids("running"))
    @rule(data=st.data())
    def finish_retry_later(self, data: st.DataObject) -> None:
        self._finish(self._pick(data, "running"), "retry_later")

    @precondition(lambda self: self._ids("running"))
    @rule(
        data=st.data(),
        outcome=st.sampled_from(["success", "error", "cancel"]),
        stale=st.sampled_from(["owner", "attempt"]),
    )
    def finish_stale(self, data: st.DataObject, outcome: str, stale: str) -> None:
        """A replica that lost the job (or an older attempt of it) reports late."""
        self._finish(self._pick(data, "running"), outcome, stale)

    def _finish(self, job_id: int, outcome: str, stale: str | None = None) -> None:
        model = self.jobs[job_id]
        assert model.owner is not None
        owner, attempt = model.owner, model.attempt
        if stale == "owner":
            owner = OWNERS[1 - OWNERS.index(owner)]
        elif stale == "attempt":
            attempt -= 1
        # The worker's rule: an error retries while attempts remain.
        if outcome in ("error", "retry_later"):
            state = "retrying" if model.attempt < model.max_attempts else "failed"
        else:
            state = {"success": "succeeded", "cancel": "cancelled"}[outcome]
        delay = 3600.0 if outcome == "retry_later" else 0.0
        rows = self.env.run(
            self.env.sql(
                QUERIES["finish_batch"],
                {
                    "ids": [job_id],
                    "attempts": [attempt],
                    "states": [state],
                    "results": [Jsonb({"ok": True}) if state == "succeeded" else None],
                    "errors": [None if state == "succeeded" else Jsonb({"type": outcome})],
                    "delays": [delay],
                    "owner": owner,
                },
            )
        )
        if stale:
            assert rows == [], "a stale acknowledgement changed a job"
            return
        assert [r["id"] for r in rows] == [job_id]
        self._set(job_id, state)
        model.due = delay == 0

    @precondition(lambda self: self._ids("running"))
    @rule(data=st.data())
    def lease_expires(self, data: st.DataObject) -> None:
        """The replica running the job vanished: its lease runs out, upkeep rescues it."""
        job_id = self._pick(data, "running")
        self.env.run(
            self.env.sql(
                "UPDATE tierline.jobs SET lease_expires_at = now() - interval '1 second' "
                "WHERE id = %s",
                (job_id,),
            )
        )
        rows = self.env.run(self.env.sql(QUERIES["rescue_expired"]))
        assert [r["id"] for r in rows] == [job_id], "rescued the wrong jobs"
        model = self.jobs[job_id]
        if model.cancel_requested:
            expected = "cancelled"
        elif model.attempt >= model.max_attempts:
            expected = "failed"
        else:
            expected = "available"
        assert rows[0]["state"] == expected
        self._set(job_id, expected)
        model.due = True

    @rule(owner=st.sampled_from(OWNERS))
    def renew(self, owner: str) -> None:
        ids = sorted(self.claimed_by[owner])
        rows = self.env.run(
            self.env.sql(QUERIES["renew_leases"], {"ids": ids, "owner": owner, "lease_s": LEASE_S})
        )
        held = {i for i in self._ids("running") if self.jobs[i].owner == owner}
        assert {r["id"] for r in rows} == held, "renewal kept jobs the replica lost"
        for r in rows:
            assert r["cancel_requested"] == self.jobs[r["id"]].cancel_requested

    @rule(owner=st.sampled_from(OWNERS))
    def release(self, owner: str) -> None:
        """Shutdown: the replica hands back what it still runs."""
        ids = sorted(self.claimed_by[owner])
        rows = self.env.run(self.env.sql(QUERIES["release"], {"ids": ids, "owner": owner}))
        held = {i for i in self._ids("running") if self.jobs[i].owner == owner}
        assert {r["id"] for r in rows} == held
        for job_id in held:
            model = self.jobs[job_id]
            if model.cancel_requested:
                self._set(job_id, "cancelled")
            else:
                model.attempt -= 1  # the interrupted attempt does not count
                self._set(job_id, "available")
                model.due = True

    @precondition(lambda self: self._ids("scheduled", "retrying"))
    @rule(data=st.data())
    def time_passes(self, data: st.DataObject) -> None:
        job_id = self._pick(data, "scheduled", "retrying")
        self.env.run(
            self.env.sql(
                "UPDATE tierline.jobs SET run_at = now() - interval '1 second' WHERE id = %s",
                (job_id,),
            )
        )
        self.jobs[job_id].due = True

    @precondition(lambda self: any(self.jobs[i].due for i in self._ids("scheduled", "retrying")))
    @rule()
    def promote(self) -> None:
        self.env.run(self.env.sql(QUERIES["promote_due"]))
        for job_id in self._ids("scheduled", "retrying"):
            if self.jobs[job_id].due:
                self._set(job_id, "available")

    # -- operators --------------------------------------------------------------------------------
    @precondition(lambda self: self._ids("running", *WAITING))
    @rule(data=st.data())
    def cancel_live(self, data: st.DataObject) -> None:
        self.cancel(data, self._pick(data, "running", *WAITING))

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject, job_id: int | None = None) -> None:
        if job_id is None:
            job_id = data.draw(st.sampled_from(sorted(self.jobs)), label="job")
        model = self.jobs[job_id]
        try:
            job = self.env.run(self.env.queue.cancel(job_id))
        except InvalidTransition:
            assert model.state in FINAL, f"cancel refused for a {model.state} job"
            return
        assert model.state not in FINAL, f"cancelled a {model.state} job"
        model.cancel_requested = True
        if model.state in WAITING:
            self._set(job_id, "cancelled")
        assert job.state == model.state and job.cancel_requested

    @precondition(lambda self: self._ids(*FINAL))
    @rule(data=st.data())
    def retry_finished(self, data: st.DataObject) -> None:
        self.retry(data, self._pick(data, *FINAL))

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def retry(self, data: st.DataObject, job_id: int | None = None) -> None:
        if job_id is None:
            job_id = data.draw(st.sampled_from(sorted(self.jobs)), label="job")
        model = self.jobs[job_id]
        try:
            job = self.env.run(self.env.queue.retry(job_id))
        except InvalidTransition:
            assert model.state not in FINAL, f"retry refused for a {model.state} job"
            return
        assert model.state in FINAL, f"retried a {model.state} job"
        self._set(job_id, "available")
        model.due = True
        model.cancel_requested = False
        model.max_attempts = max(model.max_attempts, model.attempt + 1)
        assert job.state == "available" and job.max_attempts == model.max_attempts

    @rule(job_id=st.integers(100_000, 2**62))
    def act_on_a_missing_job(self, job_id: int) -> None:
        for action in (self.env.queue.cancel, self.env.queue.retry, self.env.queue.get):
            with pytest.raises(JobNotFound):
                self.env.run(action(job_id))

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def database_matches_model(self) -> None:
        self.env.steps += 1
        rows = self.env.run(
            self.env.sql(
                "SELECT id, state, attempt, max_attempts, lease_owner::text AS owner, "
                "lease_expires_at IS NOT NULL AS leased, finished_at IS NOT NULL AS finished, "
                "cancel_requested_at IS NOT NULL AS cancel_requested, event_seq "
                "FROM tierline.jobs"
            )
        )
        by_id = {r["id"]: r for r in rows}
        assert set(by_id) == set(self.jobs), "the database lost or invented jobs"
        for job_id, model in self.jobs.items():
            row = by_id[job_id]
            where = f"job {job_id} ({' -> '.join(model.history)})"
            assert row["state"] == model.state, f"{where}: database says {row['state']}"
            assert row["attempt"] == model.attempt, where
            assert row["max_attempts"] == model.max_attempts, where
            assert row["cancel_requested"] == model.cancel_requested, where
            assert row["owner"] == model.owner, where
            assert row["leased"] == (model.state == "running"), where
            assert row["finished"] == (model.state in FINAL), where
            assert 0 <= model.attempt <= model.max_attempts, where
        events = self.env.run(
            self.env.sql(
                "SELECT job_id, array_agg(seq ORDER BY seq) AS seqs, "
                "(array_agg(type ORDER BY seq DESC))[1] AS last "
                "FROM tierline.job_stream GROUP BY job_id"
            )
        )
        seen = {e["job_id"]: e for e in events}
        for job_id, model in self.jobs.items():
            e = seen[job_id]
            n = by_id[job_id]["event_seq"]
            assert e["seqs"] == list(range(1, n + 1)), f"job {job_id}: events {e['seqs']}"
            if model.state in FINAL:
                assert e["last"] == model.state, f"job {job_id}: last event {e['last']}"

    @invariant()
    def transitions_are_legal(self) -> None:
        for job_id, model in self.jobs.items():
            for a, b in zip(model.history, model.history[1:], strict=False):
                assert (a, b) in LEGAL, f"job {job_id}: illegal {a} -> {b}"

    def teardown(self) -> None:
        for model in self.jobs.values():
            for a, b in zip(model.history, model.history[1:], strict=False):
                self.env.transitions[(a, b)] = self.env.transitions.get((a, b), 0) + 1


def test_job_state_machine(db_url: str) -> None:
    env = Env(db_url)
    JobMachine.env = env
    try:
        # The runs are random: one run usually exercises 14 to 16 of the 16 legal
        # transitions, but now and then a run of short examples misses several (CI saw
        # 12); another round then covers them, so the check below does not depend on luck.
        for _round in range(MAX_ROUNDS):
            run_state_machine_as_test(
                JobMachine,
                settings=settings(
                    max_examples=EXAMPLES,
                    stateful_step_count=STEPS,
                    deadline=None,
                    database=None,
                    # Hypothesis's "ci" profile (loaded by itself when CI is set, as in
                    # .ci/run) derandomizes: every round would replay the same examples,
                    # and the same transitions would stay unexercised in every CI run.
                    derandomize=False,
                    suppress_health_check=list(HealthCheck),
                ),
            )
            if len(LEGAL - set(env.transitions)) <= 1:
                break
    finally:
        env.close()
    missing = LEGAL - set(env.transitions)
    assert len(missing) <= 1, f"never exercised in {MAX_ROUNDS} rounds: {sorted(missing)}"
    report(
        "state_machine",
        examples=env.examples,
        steps=env.steps,
        transitions=sum(env.transitions.values()),
        kinds_of_transition=len(LEGAL) - len(missing),
        owners=len(OWNERS),
        run=uuid.uuid4().hex[:6],
    )
