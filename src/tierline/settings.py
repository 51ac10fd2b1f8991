"""Settings: every ``TIERLINE_*`` variable, parsed once into one frozen, typed object.

Only the CLI reads the environment (``Settings.from_env``); everything else receives a
``Settings``. Each field documents its default and unit; ``docs/configuration.md`` is
generated from these descriptions (``tierline config --markdown``).

Why this module is long: it is the one list of every variable, each with its
description; splitting it would scatter what operators read as one reference.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tierline.errors import SettingsError

PREFIX = "TIERLINE_"
Tier = Literal["web", "worker"]
# Read when TIERLINE_DATABASE_URL is unset: the platforms' convention (Heroku, Render, Fly).
FALLBACK_DATABASE_URL = "DATABASE_URL"


class Settings(BaseSettings):
    """The effective configuration of one Tierline process."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, frozen=True, extra="ignore", case_sensitive=False
    )

    # -- database -------------------------------------------------------------------------
    database_url: SecretStr | None = Field(
        None,
        description="Where the connection pools connect (may be PgBouncer in transaction "
        "mode). Unset: `DATABASE_URL`; else `tierline up` starts an embedded PostgreSQL "
        "in `TIERLINE_DATA_DIR`, which the other commands run in that folder join; "
        "without either they exit 2.",
    )
    database_direct_url: SecretStr | None = Field(
        None,
        description="Direct PostgreSQL URL for LISTEN, the replica registry and migrations. "
        "Default: `TIERLINE_DATABASE_URL`.",
    )
    database_read_url: SecretStr | None = Field(
        None,
        description="A read replica of the database (or a pooler in front of several): "
        "the web tier opens a second pool there for its read-only routes and "
        "`tierline.web.read_connection`; writes stay on `TIERLINE_DATABASE_URL`. Unset: "
        "every read goes to the primary.",
    )
    read_max_lag_s: float = Field(
        5.0,
        gt=0,
        description="Reads leave the replica for the primary while its replay lag, "
        "measured by the primary's clock, is above this, and come back once it is below "
        "(seconds).",
    )
    db_read_max_connections: int | None = Field(
        None,
        ge=1,
        description="Connection budget of the read replica's server, shared by the web "
        "replicas' read pools (a pooler's `max_client_conn` when one is in front). Default: "
        "the replica's `max_connections` - `superuser_reserved_connections` - "
        "`TIERLINE_DB_RESERVED_CONNECTIONS`.",
    )
    data_dir: str = Field(
        ".tierline",
        description="Folder (relative to the working directory) of the embedded PostgreSQL "
        "and of `tierline up`'s control socket.",
    )
    db_max_connections: int | None = Field(
        None,
        ge=1,
        description="Global connection budget shared by all replicas. Default: the server's "
        "`max_connections` - `superuser_reserved_connections` - "
        "`TIERLINE_DB_RESERVED_CONNECTIONS`.",
    )
    db_reserved_connections: int = Field(
        5,
        ge=0,
        description="Connections kept out of the budget for admins and migrations (connections).",
    )
    db_pool_cpu_factor: float = Field(
        4.0,
        gt=0,
        description="A pool is capped at usable CPU cores x this factor (connections per "
        "core); usable cores honour cgroup quotas and CPU affinity.",
    )
    db_pool_timeout_s: float = Field(
        5.0,
        gt=0,
        description="How long a caller waits for a pooled connection before failing "
        "(seconds): 503 on the web tier, a later retry on the worker tier.",
    )
    db_connect_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of one connection attempt (seconds)."
    )
    startup_jitter_s: float = Field(
        2.0,
        ge=0,
        description="A replica waits a random 0..this before its first connection, so a "
        "rollout is no connection storm (seconds).",
    )
    web_db_pool_min: int = Field(
        1, ge=0, description="Connections the web pool keeps open (connections)."
    )
    web_db_pool_max: int = Field(
        4, ge=1, description="Most connections the web pool may open (connections)."
    )
    web_db_read_pool_min: int = Field(
        1,
        ge=0,
        description="Connections the web tier's read pool keeps open on the read replica "
        "(connections); used with `TIERLINE_DATABASE_READ_URL`.",
    )
    web_db_read_pool_max: int = Field(
        4,
        ge=1,
        description="Most connections the web tier's read pool may open on the read replica "
        "(connections); claimed against the replica's own budget.",
    )
    worker_db_pool_min: int = Field(
        1, ge=0, description="Connections the worker pool keeps open (connections)."
    )
    worker_db_pool_max: int = Field(
        4,
        ge=1,
        description="Most connections the worker pool may open (connections). The worker "
        "itself needs 2; add the concurrency when handlers use `ctx.connection()`.",
    )

    # -- application ----------------------------------------------------------------------
    app: str = Field("tierline.demo:app", description="The application, as `module:attribute`.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level logged."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto",
        description="`json` for machines, `console` for people; `auto` picks "
        "console on a terminal.",
    )

    # -- web tier -------------------------------------------------------------------------
    web_host: str = Field("127.0.0.1", description="Address the web tier listens on.")
    web_port: int = Field(8000, ge=0, le=65535, description="Port of the web tier.")
    web_app: str | None = Field(
        None,
        description="The application's own ASGI app (module:attribute: FastAPI, Starlette, "
        "Django's `get_asgi_application()`...), served by the web tier beside Tierline's "
        "API, which then moves under `TIERLINE_WEB_API_PREFIX`. Unset: Tierline's API only.",
    )
    web_api_prefix: str = Field(
        "/tierline",
        pattern=r"^(/[A-Za-z0-9._~-]+)+$",
        description="Where Tierline's API and dashboard live when `TIERLINE_WEB_APP` is set "
        "(`/healthz`, `/readyz` and `/metrics` stay at the root).",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated API keys, each `KEY` (all scopes) or "
        "`KEY:scope+scope` with scopes `enqueue`, `read`, `admin`. Set: every `/v1` route "
        "requires `Authorization: Bearer KEY`.",
    )
    protect_metrics: bool = Field(
        False,
        description="Require a key with the `read` scope for `/metrics` too (the dashboard "
        "page is static; the data it reads always needs a key when keys are set).",
    )
    cors_origins: str = Field(
        "", description="Comma-separated origins allowed by CORS (none by default)."
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest accepted request body (bytes)."
    )
    max_args_bytes: int = Field(
        262_144, ge=64, description="Largest accepted `args` of one job, as JSON (bytes)."
    )
    max_batch_size: int = Field(
        1000, ge=1, description="Most jobs in one `POST /v1/jobs/batch` (jobs)."
    )
    max_events_per_job: int = Field(
        10_000, ge=10, description="Most progress and log events stored per job (events)."
    )
    sse_heartbeat_s: float = Field(
        15.0, gt=0, description="Interval of SSE heartbeat comments (seconds)."
    )
    sse_max_streams: int = Field(
        2000, ge=1, description="Most concurrent SSE streams per web replica (streams)."
    )
    sse_buffer_events: int = Field(
        1000,
        ge=10,
        description="Events buffered per stream before a slow client is disconnected "
        "(events); it can resume with `Last-Event-ID`.",
    )

    # -- worker tier ----------------------------------------------------------------------
    worker_queues: str = Field("default", description="Comma-separated queues to work.")
    worker_concurrency: int = Field(
        10, ge=1, le=10_000, description="Jobs one worker replica runs at once (jobs)."
    )
    worker_shutdown_grace_s: float = Field(
        25.0,
        ge=0,
        description="On SIGTERM, how long running jobs may finish before they are handed "
        "back (seconds).",
    )
    worker_poll_interval_s: float = Field(
        1.0,
        gt=0,
        description="Polling interval when no notification arrives (seconds).",
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="Address of the worker's metrics and health listener."
    )
    worker_metrics_port: int = Field(
        9100,
        ge=0,
        le=65535,
        description="Port of the worker's `/metrics`, `/healthz`, `/readyz` (0: any free).",
    )
    worker_cancel_grace_s: float = Field(
        10.0,
        ge=0,
        description="How long a running job may react to a cancel request before it is "
        "cancelled hard (seconds).",
    )
    worker_executor: Literal["thread", "process"] = Field(
        "thread",
        description="Where plain-function handlers run unless registered with "
        "`@app.job(executor=...)`: `thread` (threads of the worker; Python cannot stop a "
        "thread, so a timed-out one keeps its slot until it returns) or `process` (child "
        "processes, killed on timeout or hard cancel; use it for CPU-bound jobs). "
        "Handlers with `uses_db=True` stay in threads.",
    )
    worker_children: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Child processes of the process executor, started once and reused "
        "(processes). Default: the usable CPU cores (cgroup-aware); never more than "
        "`TIERLINE_WORKER_CONCURRENCY`, whose slots they count against.",
    )
    worker_max_jobs_per_child: int | None = Field(
        None,
        ge=1,
        description="Replace a child process after this many jobs, between jobs (jobs). "
        "Default: never.",
    )
    worker_max_child_memory_mb: float | None = Field(
        None,
        gt=0,
        description="Replace a child process whose resident memory is above this after a "
        "job, between jobs (MiB). Default: no limit.",
    )
    job_lease_s: float = Field(
        30.0,
        ge=2,
        description="Lease of a running job, renewed by heartbeats; when it runs out the "
        "job is available again (seconds).",
    )
    job_retention_s: float = Field(
        7 * 86400.0,
        ge=0,
        description="Finished jobs and their events are pruned after this (seconds).",
    )
    heartbeat_s: float = Field(
        5.0, gt=0, description="Interval of replica and lease heartbeats (seconds)."
    )
    replica_lease_s: float = Field(
        10.0,
        gt=0,
        description="A replica silent for longer than this is dead and its connection "
        "claim released (seconds).",
    )
    backlog_target_s: float = Field(
        300.0,
        gt=0,
        description="Recommendations size the worker tier to drain the backlog within this "
        "(seconds).",
    )
    target_utilization: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Utilisation the recommendations aim for, per worker slot and per web "
        "replica (ratio).",
    )
    web_replica_capacity_rps: float = Field(
        500.0,
        gt=0,
        description="Requests per second one web replica serves at the latency target "
        "(requests/s); measure it with `bench/web-latency`.",
    )
    web_replicas_min: int = Field(1, ge=0, description="Fewest web replicas recommended.")
    web_replicas_max: int = Field(20, ge=1, description="Most web replicas recommended.")
    worker_replicas_min: int = Field(1, ge=0, description="Fewest worker replicas recommended.")
    worker_replicas_max: int = Field(50, ge=1, description="Most worker replicas recommended.")

    # -- the commands (`tierline up`, `enqueue`, `watch`) -------------------------------------
    up_web: int = Field(1, ge=0, le=64, description="Web replicas `tierline up` starts.")
    up_workers: int = Field(2, ge=0, le=64, description="Worker replicas `tierline up` starts.")
    url: str | None = Field(
        None,
        description="Web tier URL of `tierline enqueue` and `tierline watch` (several "
        "comma-separated: `watch` fails over between them). Default: "
        "http://`TIERLINE_WEB_HOST`:`TIERLINE_WEB_PORT`.",
    )
    api_key: SecretStr | None = Field(
        None, description="API key that `tierline enqueue` and `tierline watch` send."
    )

    # -- least-privilege roles (`tierline migrate --create-roles`) --------------------------
    create_roles: bool = Field(
        False,
        description="`tierline migrate` also creates (if missing) and grants the "
        "least-privilege roles, as `--create-roles` does.",
    )
    web_role: str = Field(
        "tierline_web",
        pattern=r"^[a-z_][a-z0-9_]{0,39}$",
        description="Database role of the web tier, created and granted by "
        "`tierline migrate --create-roles`.",
    )
    worker_role: str = Field(
        "tierline_worker",
        pattern=r"^[a-z_][a-z0-9_]{0,39}$",
        description="Database role of the worker tier, created and granted by "
        "`tierline migrate --create-roles`.",
    )
    web_role_password: SecretStr | None = Field(
        None,
        description="Password set on the web role by `tierline migrate --create-roles` "
        "(sent SCRAM-hashed). Unset: a new role gets a generated one, printed once; an "
        "existing role keeps its password.",
    )
    worker_role_password: SecretStr | None = Field(
        None,
        description="Password set on the worker role, as for `TIERLINE_WEB_ROLE_PASSWORD`.",
    )

    @field_validator("worker_queues")
    @classmethod
    def _queues(cls, value: str) -> str:
        queues = [q.strip() for q in value.split(",") if q.strip()]
        if not queues:
            raise ValueError("expected at least one queue name")
        for q in queues:
            if len(q) > 100 or not q.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"queue names are letters, digits, '-', '_', '.': {q!r}")
        return ",".join(queues)

    @field_validator("app", "web_app")
    @classmethod
    def _app(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.count(":") != 1 or not all(value.split(":")):
            raise ValueError("expected module:attribute, e.g. myapp.jobs:app")
        return value

    @model_validator(mode="after")
    def _pools(self) -> Settings:
        for pool in ("web_db_pool", "worker_db_pool", "web_db_read_pool"):
            lo, hi = getattr(self, f"{pool}_min"), getattr(self, f"{pool}_max")
            if lo > hi:
                raise ValueError(
                    f"{PREFIX}{pool.upper()}_MIN={lo} is larger than "
                    f"{PREFIX}{pool.upper()}_MAX={hi}"
                )
        return self

    # -- constructors and views -----------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Parse ``env`` (default: ``os.environ``); ``overrides`` win (CLI flags)."""
        env = os.environ if env is None else env
        known = {f"{PREFIX}{name}".upper(): name for name in cls.model_fields}
        values: dict[str, Any] = {
            known[k.upper()]: v for k, v in env.items() if k.upper() in known and v != ""
        }
        if "database_url" not in values and env.get(FALLBACK_DATABASE_URL):
            values["database_url"] = env[FALLBACK_DATABASE_URL]  # Heroku/Render/Fly
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc, values)) from None

    def queues(self) -> list[str]:
        return self.worker_queues.split(",")

    def pool_bounds(self, tier: Tier) -> tuple[int, int]:
        """The requested (min, max) of a tier's pool, before caps."""
        if tier == "web":
            return self.web_db_pool_min, self.web_db_pool_max
        return self.worker_db_pool_min, self.worker_db_pool_max

    def dsn(self) -> str:
        if self.database_url is None:
            raise SettingsError(f"{PREFIX}DATABASE_URL is not set")
        return self.database_url.get_secret_value()

    def read_dsn(self) -> str | None:
        """The read replica's URL, or None when reads stay on the primary."""
        return self.database_read_url.get_secret_value() if self.database_read_url else None

    def direct_dsn(self) -> str:
        url = self.database_direct_url or self.database_url
        if url is None:
            raise SettingsError(f"{PREFIX}DATABASE_URL is not set")
        return url.get_secret_value()


def env_name(field: str) -> str:
    return f"{PREFIX}{field.upper()}"


def _describe(exc: ValidationError, values: Mapping[str, Any]) -> str:
    err = exc.errors()[0]
    loc = err.get("loc") or ()
    if loc:
        field = str(loc[0])
        value = values.get(field)
        shown = "<secret>" if "url" in field or "key" in field else repr(value)
        return f"{env_name(field)}={shown}: {_allowed(err)}"
    return str(err.get("msg", exc)).removeprefix("Value error, ")


def _allowed(err: Any) -> str:
    ctx = err.get("ctx") or {}
    kind = err.get("type", "")
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "expected a whole number"
    if kind in ("float_parsing", "float_type"):
        return "expected a number"
    if kind in ("bool_parsing", "bool_type"):
        return "expected true or false"
    for bound, words in (("ge", "at least"), ("gt", "greater than"), ("le", "at most")):
        if bound in ctx:
            return f"expected a number {words} {ctx[bound]}"
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")
