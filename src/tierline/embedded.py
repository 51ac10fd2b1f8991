"""The embedded PostgreSQL: a private server from the ``pgserver`` wheel.

Used by the CLI when ``TIERLINE_DATABASE_URL`` is not set, so ``tierline up`` works on a
laptop with nothing installed. Every other code path sees only a URL.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from tierline.errors import EmbeddedDatabaseError

HOW_TO_POINT = (
    "set TIERLINE_DATABASE_URL to a PostgreSQL >= 14 server, e.g. "
    "TIERLINE_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres"
)

_servers: dict[Path, Any] = {}


def start(data_dir: str | os.PathLike[str]) -> str:
    """Start (or join) the embedded server in ``data_dir/pgdata``; return its URL."""
    folder = Path(data_dir).resolve() / "pgdata"
    if folder in _servers:
        return str(_servers[folder].get_uri())
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:
        raise EmbeddedDatabaseError(
            f"the embedded PostgreSQL needs the pgserver package ({exc}); {HOW_TO_POINT}"
        ) from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # 'stop' leaves the server to the last process that uses it.
        server = pgserver.get_server(folder, cleanup_mode="stop")  # type: ignore[attr-defined]
    except Exception as exc:  # pgserver raises plain exceptions of several kinds
        raise EmbeddedDatabaseError(
            f"could not start the embedded PostgreSQL in {folder}: {exc}; {HOW_TO_POINT}"
        ) from None
    _servers[folder] = server
    return str(server.get_uri())
