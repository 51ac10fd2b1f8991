"""The read replica's lag by the primary's clock, the routing decision, the read pool's
arithmetic: pure, no database (the e2e tests are in test_read_replica.py)."""

from __future__ import annotations

from tierline import budget
from tierline.cores import Cores
from tierline.read_routing import ReadRouter
from tierline.settings import Settings


def router(max_lag_s: float = 2.0) -> ReadRouter:
    settings = Settings.from_env(
        {},
        database_url="postgresql://primary/db",
        database_read_url="postgresql://replica/db",
        read_max_lag_s=max_lag_s,
    )
    return ReadRouter(settings, lambda: None, lambda: None)


def test_lag_is_zero_when_the_replica_has_everything_the_primary_wrote() -> None:
    r = router()
    assert r._lag(100, 1000.0, 100) == 0.0
    assert r._lag(100, 1010.0, 100) == 0.0  # an idle primary is no lag, however long


def test_lag_is_the_age_of_the_oldest_write_the_replica_misses() -> None:
    r = router()
    assert r._lag(100, 1000.0, 100) == 0.0
    # Replay stops at 100 while the primary writes on: the lag counts from the last
    # position the replica had (sampled at 1000.0), by the primary's clock.
    assert r._lag(150, 1000.5, 100) == 0.5
    assert r._lag(200, 1003.0, 100) == 3.0
    # It replays up to 150 (sampled at 1000.5): the lag drops to the age of that sample.
    assert r._lag(250, 1003.5, 150) == 3.0
    assert r._lag(250, 1004.0, 250) == 0.0


def test_lag_is_unknown_until_the_replica_reaches_a_sampled_position() -> None:
    r = router()
    assert r._lag(500, 1000.0, 10) is None  # behind everything seen: not known yet
    assert r._lag(600, 1000.5, 500) == 0.5


def test_reads_leave_above_the_limit_and_return_at_half_of_it() -> None:
    r = router(max_lag_s=2.0)
    r.lag_s = None
    r._decide()
    assert not r.use_replica  # unconfirmed position: the primary
    r.lag_s = 0.5
    r._decide()
    assert r.use_replica and r.target == "primary"  # (no read pool in this test)
    r.lag_s = 2.5
    r._decide()
    assert not r.use_replica and "above TIERLINE_READ_MAX_LAG_S" in r.reason
    r.lag_s = 1.5  # below the limit, above half of it: stays on the primary
    r._decide()
    assert not r.use_replica
    r.lag_s = 1.0
    r._decide()
    assert r.use_replica and r.reason == ""


def test_the_read_pool_is_claimed_without_a_listen_connection() -> None:
    s = Settings.from_env({}, web_db_read_pool_max=6, db_read_max_connections=20)
    plan = budget.read_pool(s, Cores(usable=1, host=8, source="test", quota=1))
    assert plan.max_size == 4 and plan.caps[0].variable == "TIERLINE_WEB_DB_READ_POOL_MAX"
    assert plan.claimed == 4  # no LISTEN connection on the replica
    fitted = budget.fit_to_budget(plan, free=3, budget_total=20)
    assert fitted is not None and fitted.max_size == 3 and fitted.claimed == 3
    assert "for LISTEN" not in fitted.caps[-1].reason
    assert budget.fit_to_budget(plan, free=0, budget_total=20) is None
    assert budget.budget(s, 100, 3, read=True).source == "TIERLINE_DB_READ_MAX_CONNECTIONS"
