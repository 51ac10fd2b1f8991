"""One exception root for everything Tierline raises on purpose."""

from __future__ import annotations


class TierlineError(Exception):
    """Tierline failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class SettingsError(TierlineError):
    """A setting is invalid."""


class DatabaseUnavailable(TierlineError):
    """The database cannot be reached."""


class SchemaError(TierlineError):
    """The database schema is missing or does not match this version of Tierline."""


class EmbeddedDatabaseError(TierlineError):
    """The embedded PostgreSQL could not be started."""


class BudgetExhausted(TierlineError):
    """The connection budget has no room for this replica."""


class JobNotFound(TierlineError):
    """No such job."""


class InvalidJob(TierlineError):
    """The job is invalid."""


class UnknownKind(InvalidJob):
    """No handler is registered for this kind."""

    def __init__(self, kind: str, known: list[str]) -> None:
        super().__init__(f"unknown job kind {kind!r}; known kinds: {', '.join(known)}")
        self.kind = kind
        self.known = known


class InvalidTransition(TierlineError):
    """The job is not in a state that allows this."""


class AppLoadError(TierlineError):
    """The application could not be loaded."""


class ListenError(TierlineError):
    """A tier could not listen on its address."""
