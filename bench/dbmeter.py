"""What a measured phase cost the database: WAL bytes, transactions and statements.

WAL is read from ``pg_current_wal_lsn()`` before and after (``pg_wal_lsn_diff``): that
is server-wide, so on a shared server other sessions' writes are counted too (run on a
private server, ``--private-server``, for clean figures). Transactions are the
database's own ``xact_commit + xact_rollback`` (``pg_stat_database``). Statements come
from ``pg_stat_statements`` when the server has it loaded, else they are None. A
statement is a round trip for a client that does not pipeline; Tierline's claim and
acknowledgement send two statements in one round trip (``database.one_round_trip``),
so for Tierline the count is an upper bound on its round trips.

Only psycopg is imported: the peers' runner (``bench/compare_peers.py``, in the peers'
venv) uses this module too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

# Statistics of a backend reach pg_stat_database when it goes idle, at most about once a
# second (PostgreSQL >= 15); pg_stat_statements is updated at once.
STATS_FLUSH_S = 1.1


@dataclass
class Reading:
    lsn: str
    xacts: int
    statements: int | None


@dataclass
class Cost:
    """A phase's cost in total and per job (``jobs``)."""

    wal_bytes: int
    xacts: int
    statements: int | None
    jobs: int

    def per_job(self) -> dict[str, Any]:
        n = max(self.jobs, 1)
        return {
            "wal_bytes_per_job": round(self.wal_bytes / n, 1),
            "xacts_per_job": round(self.xacts / n, 4),
            "statements_per_job": None
            if self.statements is None
            else round(self.statements / n, 4),
            "wal_bytes": self.wal_bytes,
            "xacts": self.xacts,
            "statements": self.statements,
        }


class Meter:
    """Readings of one database (``dbname``) through an admin connection (``admin_url``)."""

    def __init__(self, admin_url: str, dbname: str) -> None:
        self.admin_url = admin_url
        self.dbname = dbname
        self.statements_available = self._has_statements()

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            return conn.execute(sql.encode(), params).fetchall()

    def _has_statements(self) -> bool:
        try:
            rows = self._query("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'")
            if not rows:
                return False
            self._query("SELECT count(*) FROM pg_stat_statements")
        except psycopg.Error:
            return False
        return True

    def read(self) -> Reading:
        time.sleep(STATS_FLUSH_S)
        lsn = self._query("SELECT pg_current_wal_lsn()::text")[0][0]
        xacts = self._query(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (self.dbname,),
        )[0][0]
        statements = None
        if self.statements_available:
            statements = self._query(
                "SELECT coalesce(sum(s.calls), 0)::bigint FROM pg_stat_statements s "
                "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s",
                (self.dbname,),
            )[0][0]
        return Reading(str(lsn), int(xacts), None if statements is None else int(statements))

    def cost(self, before: Reading, after: Reading, jobs: int) -> Cost:
        wal = self._query(
            "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::bigint", (after.lsn, before.lsn)
        )[0][0]
        statements = None
        if before.statements is not None and after.statements is not None:
            # The admin connection's own statements run in another database: not counted.
            statements = after.statements - before.statements
        # The meter's own reading of pg_stat_database is no transaction of this database.
        return Cost(int(wal), after.xacts - before.xacts, statements, jobs)
