"""Servers a test owns: a private PostgreSQL with its own settings (max_connections=40),
and PgBouncer in transaction mode in front of a server.

Both run as real processes on free ports in temporary folders. PostgreSQL and PgBouncer
refuse to run as root, so as root they run as an unprivileged user (``postgres``,
``pgserver`` or ``nobody``, whichever exists).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from tests.helpers import free_port, wait_for

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def postgres_bindir() -> Path:
    """The binaries bundled with pgserver (a dependency), else the system's."""
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        found = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (found / "postgres").exists():
            return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").exists():
            return candidate
    raise RuntimeError("no PostgreSQL binaries: install pgserver or postgresql")


def _run_as() -> dict[str, Any]:
    """Popen arguments that drop root to an unprivileged user (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "pgserver", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    raise RuntimeError("running as root without an unprivileged user for PostgreSQL")


def _private_dir(prefix: str) -> Path:
    """A folder the server's user owns (pytest's tmp_path is root-only when run as root)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    who = _run_as()
    if who:
        os.chown(folder, who["user"], who["group"])
    return folder


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def with_host(url: str, host: str, port: int) -> str:
    """``url`` pointing at ``host:port``, user and password kept."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(
        parts._replace(netloc=f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}")
    )


class PrivateServer:
    """A PostgreSQL started by one test, with settings of its own (``-c name=value``)."""

    def __init__(self, **settings: Any) -> None:
        self.port = free_port()
        self.settings = {"max_connections": 100, **settings}
        self.dir = _private_dir("tierline-pg-")
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> PrivateServer:
        bindir = postgres_bindir()
        initdb = [str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"]
        subprocess.run(
            [*initdb, "-E", "UTF8", "--no-sync", "--no-instructions"],
            check=True,
            capture_output=True,
            timeout=120,
            **_run_as(),
        )
        options = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            **self.settings,
        }
        args = [str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for name, value in options.items():
            args += ["-c", f"{name}={value}"]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the server writes it until stop()
        try:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **_run_as()
            )
        finally:
            log.close()

        def accepting() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{self.log_path.read_text()[-2000:]}")
            with psycopg.connect(self.url(), connect_timeout=2):
                return True

        wait_for(accepting, 60, f"private PostgreSQL on port {self.port}", interval=0.1)
        return self

    def execute(self, sql: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            cur = conn.execute(sql.encode())
            return cur.fetchall() if cur.description else []

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)  # SIGINT: fast shutdown, disconnects clients
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class PgBouncer:
    """PgBouncer in transaction mode in front of ``server_url``'s host and port."""

    def __init__(self, server_url: str, *, pool_size: int = 20, max_client_conn: int = 2000):
        parts = urlsplit(server_url)
        self.server_host = parts.hostname or "127.0.0.1"
        self.server_port = parts.port or 5432
        self.port = free_port()
        self.dir = _private_dir("tierline-pgbouncer-")
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "pgbouncer.log"

    def url(self, db_url: str) -> str:
        """``db_url`` through PgBouncer when it points at the server behind it."""
        parts = urlsplit(db_url)
        if (parts.hostname, parts.port or 5432) != (self.server_host, self.server_port):
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
        who = _run_as()
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
            _stop(self.proc, signal.SIGTERM)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
