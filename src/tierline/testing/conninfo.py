"""Database URLs the harness rewrites (another database, host, user), read with psycopg's
conninfo parser rather than split on ``/`` and ``@``.

A URL means what libpq makes of it: in the embedded server's unix-socket URL,
``postgresql://postgres:@/postgres?host=/tmp/…/pgdata``, the host is the socket folder in
the query string and the database is the path; a key=value DSN works as well. Rewritten
URLs come back as ``postgresql://`` URLs (the form ``TIERLINE_DATABASE_URL`` documents),
with a socket folder kept in ``?host=``.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from psycopg.conninfo import conninfo_to_dict

DEFAULT_PORT = 5432


def parse(url: str) -> dict[str, str]:
    """The connection parameters of ``url`` (a URL or a key=value DSN)."""
    return {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}


def to_url(params: dict[str, str]) -> str:
    """A ``postgresql://`` URL for ``params``; a unix-socket folder goes in ``?host=``."""
    rest = dict(params)
    user, password = rest.pop("user", ""), rest.pop("password", None)
    host, port, dbname = rest.pop("host", ""), rest.pop("port", ""), rest.pop("dbname", "")
    netloc = ""
    if user:
        netloc = quote(user, safe="")
        if password is not None:
            netloc += ":" + quote(password, safe="")
        netloc += "@"
    if host and not host.startswith("/") and "," not in host:
        netloc += f"[{host}]" if ":" in host else host  # an IPv6 address needs brackets
        if port:
            netloc += f":{port}"
    else:  # a socket folder, several hosts, or the default: libpq reads them as options
        rest.update({k: v for k, v in (("host", host), ("port", port)) if v})
    path = f"/{quote(dbname, safe='')}" if dbname else ""
    query = f"?{urlencode(rest)}" if rest else ""
    return f"postgresql://{netloc}{path}{query}"


def replace(url: str, **params: str) -> str:
    """``url`` with some parameters changed (``dbname=``, ``host=``, ``user=``…)."""
    return to_url({**parse(url), **params})


def server(url: str) -> tuple[str, int]:
    """(host, port) of the server ``url`` reaches: a socket folder is a host too; no
    host means libpq's default, reported as ``""``."""
    params = parse(url)
    return params.get("host", ""), int(params.get("port") or DEFAULT_PORT)
