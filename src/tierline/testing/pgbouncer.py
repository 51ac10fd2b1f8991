"""PgBouncer in transaction mode in front of a PostgreSQL server, started by a test (or a
whole session: ``TIERLINE_TEST_PGBOUNCER=1``) on a free port in a temporary folder.

The server may be reached over TCP or a unix socket (the embedded server's URL names its
socket folder in ``?host=``); clients reach PgBouncer over TCP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import psycopg

from tierline.testing import conninfo
from tierline.testing.ports import free_port
from tierline.testing.postgres import owned_dir, run_as, stop_process
from tierline.testing.routing import with_host
from tierline.testing.waiting import wait_for

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgBouncer:
    """PgBouncer in transaction mode in front of ``server_url``'s host and port."""

    def __init__(self, server_url: str, *, pool_size: int = 20, max_client_conn: int = 2000):
        self.server_host, self.server_port = _server(server_url)
        # As root, PgBouncer runs as the owner of the server's socket folder, the one user
        # sure to reach the socket (the embedded server's folder is private to its user).
        self.owner_of = Path(self.server_host) if self.server_host.startswith("/") else None
        self.port = free_port()
        self.dir = owned_dir("tierline-pgbouncer-", self.owner_of)
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "pgbouncer.log"

    def url(self, db_url: str) -> str:
        """``db_url`` through PgBouncer when it points at the server behind it."""
        if _server(db_url) != (self.server_host, self.server_port):
            return db_url
        return with_host(db_url, "127.0.0.1", self.port)

    def start(self) -> PgBouncer:
        users = self.dir / "users.txt"
        users.write_text('"postgres" ""\n')
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={self.server_host} port={self.server_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            # Roles the tests create later are looked up on the server (trust still
            # skips the password check).
            "auth_user = postgres\n"
            "admin_users = postgres\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            f"max_client_conn = {self.max_client_conn}\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            "server_login_retry = 1\n"
        )
        who = run_as(self.owner_of)
        if who:
            for path in (users, ini):
                os.chown(path, who["user"], who["group"])
        log = open(self.log_path, "wb")  # noqa: SIM115 - PgBouncer writes it until stop()
        try:
            self.proc = subprocess.Popen(
                [PGBOUNCER, str(ini)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **who,
            )
        finally:
            log.close()

        def accepting() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited:\n{self.log_path.read_text()[-2000:]}")
            self.show("VERSION")
            return True

        wait_for(accepting, 30, f"PgBouncer on port {self.port}", interval=0.1)
        return self

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW what`` on the admin console (STATS, POOLS, CLIENTS, SERVERS...)."""
        url = f"postgresql://postgres@127.0.0.1:{self.port}/pgbouncer"
        # The admin console speaks only the simple query protocol.
        with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
            cur = psycopg.ClientCursor(conn)
            cur.execute(f"SHOW {what}".encode())
            names = [c.name for c in cur.description or []]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def _server(url: str) -> tuple[str, int]:
    """(host, port) of ``url``'s server; 127.0.0.1 when the URL names no host."""
    host, port = conninfo.server(url)
    return host or "127.0.0.1", port
