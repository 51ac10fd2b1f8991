"""A private PostgreSQL server a test owns: its own settings (``max_connections=40``), a
password to get wrong, and stops, restarts and crashes that touch nobody else's server.

It runs as a real process on a free port in a temporary folder. PostgreSQL refuses to
run as root, so as root it runs as an unprivileged user (``postgres``, ``embedded_postgres``,
``pgserver`` or ``nobody``, whichever exists); PgBouncer (``pgbouncer``) does the same.
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

import psycopg

from tierline.embedded import BUNDLED_MODULE
from tierline.testing.ports import free_port


def postgres_bindir() -> Path:
    """The binaries of the embedded server's package (``tierline[embedded]``, a dev
    dependency: the same version everywhere), else the newest of the system's."""
    spec = importlib.util.find_spec(BUNDLED_MODULE)
    if spec is not None and spec.submodule_search_locations:
        found = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (found / "postgres").exists():
            return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").exists():
            return candidate
    raise RuntimeError("no PostgreSQL binaries: install 'tierline[embedded]' or postgresql")


def system_bindir() -> Path:
    """The newest of the system's PostgreSQL binaries (Debian's ``/usr/lib/postgresql/N``),
    e.g. for a primary and its streaming replica, which need the same major version."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").exists() and (candidate / "pg_basebackup").exists():
            return candidate
    raise RuntimeError("no system PostgreSQL binaries under /usr/lib/postgresql")


def run_as(owner_of: Path | None = None) -> dict[str, Any]:
    """Popen arguments that drop root to an unprivileged user (nothing when not root):
    the owner of ``owner_of`` when given (e.g. a server's socket folder, so the process
    can reach it), else the first of the usual users that exists."""
    if os.geteuid() != 0:
        return {}
    if owner_of is not None:
        st = owner_of.stat()
        if st.st_uid != 0:
            return {"user": st.st_uid, "group": st.st_gid, "extra_groups": []}
    for name in ("postgres", "embedded_postgres", "pgserver", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    raise RuntimeError("running as root without an unprivileged user for PostgreSQL")


def owned_dir(prefix: str, owner_of: Path | None = None) -> Path:
    """A folder the server's user owns (pytest's tmp_path is root-only when run as root);
    ``owner_of``: as in ``run_as``."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    give_away(folder, owner_of)
    return folder


def give_away(path: Path, owner_of: Path | None = None) -> None:
    """Make ``path`` the server user's (when running as root); ``owner_of``: as in
    ``run_as``."""
    who = run_as(owner_of)
    if who:
        os.chown(path, who["user"], who["group"])


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> None:
    """Send ``sig``; SIGKILL when it has not exited within 30 seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class PostgresServer:
    """A PostgreSQL started by one test, with settings of its own (``-c name=value``).

    ``start()`` creates the cluster the first time; ``stop("fast")`` shuts it down
    cleanly, ``stop("immediate")`` crashes it (recovery at the next ``start()``);
    ``close()`` removes everything. As a context manager: started, then closed.
    ``password``: host connections need it (scram-sha-256), to test wrong passwords.
    ``bindir``: whose binaries (default ``postgres_bindir()``). ``replica_of(primary)``
    makes a streaming replica of a running server (``pg_basebackup -R``).
    """

    def __init__(
        self, *, password: str | None = None, bindir: Path | None = None, **settings: Any
    ) -> None:
        self.port = free_port()
        self.password = password
        self.settings = {"max_connections": 100, **settings}
        self.bin = bindir or postgres_bindir()
        self.dir = owned_dir("tierline-pg-")
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        auth = f"{user}:{self.password}@" if self.password else f"{user}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{dbname}"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        subprocess.run(
            [str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            timeout=timeout,
            **run_as(),
        )

    def _initdb(self) -> None:
        args = ["-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--no-sync"]
        args.append("--no-instructions")
        if self.password:
            pwfile = self.dir / "pw"
            pwfile.write_text(self.password)
            give_away(pwfile)
            args += ["--auth-local=trust", "--auth-host=scram-sha-256", "--pwfile", str(pwfile)]
        else:
            args += ["-A", "trust"]
        self._run("initdb", *args)

    def start(self) -> PostgresServer:
        """Start it (creating the cluster the first time); returns once it accepts."""
        if not self.data.exists():
            self._initdb()
        options = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.dir),
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            **self.settings,
        }
        flags = " ".join(f"-c {name}={value}" for name, value in options.items())
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", f"-p {self.port} {flags}",
            "-l", str(self.log_path), "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    @classmethod
    def replica_of(cls, primary: PostgresServer, **settings: Any) -> PostgresServer:
        """A hot-standby streaming replica of ``primary`` (running, same binaries), cloned
        with ``pg_basebackup -R`` (the replication connection goes over the primary's
        socket, which its default ``pg_hba.conf`` trusts). Started; ``close()`` it too."""
        replica = cls(password=primary.password, bindir=primary.bin, **settings)
        replica._run(
            "pg_basebackup", "-D", str(replica.data), "-R", "-X", "stream", "-c", "fast",
            "-h", str(primary.dir), "-p", str(primary.port), "-U", "postgres",
        )  # fmt: skip
        replica.settings.setdefault("hot_standby", "on")
        return replica.start()

    def pause_replay(self) -> None:
        """Stop applying WAL (a replica): its data stays as it is while the primary moves on."""
        self.execute("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self.execute("SELECT pg_wal_replay_resume()")

    def replayed_lsn(self) -> str:
        """How far a replica has applied the primary's WAL."""
        return str(self.execute("SELECT pg_last_wal_replay_lsn()::text")[0][0])

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clean shutdown, clients disconnected; ``immediate``: a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def execute(self, sql: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement as the superuser (over the socket: no password)."""
        conninfo = f"host={self.dir} port={self.port} user=postgres dbname={dbname}"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            cur = conn.execute(sql.encode())
            return cur.fetchall() if cur.description else []

    def close(self) -> None:
        """Stop it if running (immediately: its data is thrown away), remove its folder."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()
