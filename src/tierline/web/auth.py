"""API keys with scopes (``enqueue``, ``read``, ``admin``), compared in constant time.

``TIERLINE_API_KEYS`` holds ``KEY`` (every scope) or ``KEY:scope+scope`` entries,
comma-separated. Keys are never logged; a request is matched against every key so the
time taken does not depend on which key (or how much of one) matched.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from starlette.requests import HTTPConnection

from tierline.errors import SettingsError
from tierline.web.errors import ApiError

SCOPES = ("enqueue", "read", "admin")


@dataclass(frozen=True)
class Key:
    digest: bytes
    scopes: frozenset[str]


class KeyRing:
    def __init__(self, spec: str | None) -> None:
        self.keys: list[Key] = []
        for entry in (spec or "").split(","):
            entry = entry.strip()
            if not entry:
                continue
            secret, _, scopes = entry.partition(":")
            wanted = frozenset(s for s in scopes.split("+") if s) or frozenset(SCOPES)
            if unknown := wanted - set(SCOPES):
                raise SettingsError(
                    f"TIERLINE_API_KEYS: unknown scope {sorted(unknown)[0]!r}; "
                    f"allowed: {', '.join(SCOPES)}"
                )
            if len(secret) < 8:
                raise SettingsError("TIERLINE_API_KEYS: every key needs at least 8 characters")
            self.keys.append(Key(_digest(secret), wanted))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self, conn: HTTPConnection, scope: str) -> None:
        """Raise 401 without a valid key, 403 when the key lacks ``scope``."""
        if not self.keys:
            return
        header = conn.headers.get("authorization", "")
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "unauthorized",
                "missing API key: send Authorization: Bearer KEY",
                headers={"WWW-Authenticate": "Bearer"},
            )
        digest = _digest(token.strip())
        found: Key | None = None
        for key in self.keys:  # no early exit: constant time over the key ring
            if hmac.compare_digest(key.digest, digest):
                found = key
        if found is None:
            raise ApiError(
                401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"}
            )
        if scope not in found.scopes and "admin" not in found.scopes:
            raise ApiError(403, "forbidden", f"this key lacks the {scope!r} scope")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
