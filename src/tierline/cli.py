"""The ``tierline`` command. Thin: it reads the environment into ``Settings``, resolves the
database, and hands over to the tiers. Every flag has an environment variable.

Why this module is long: it is the list of commands, one short function each (flags,
then a call into the module that does the work), in the order ``tierline --help`` shows
them; split up, the command list would have no single place to read.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
from pydantic import SecretStr

from tierline import __version__
from tierline.errors import AppLoadError, TierlineError
from tierline.settings import FALLBACK_DATABASE_URL, Settings, env_name


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"tierline: error: {message}", err=True)
    sys.exit(code)


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except TierlineError as exc:
        fail(str(exc))


def setup_logging(settings: Settings, **context: Any) -> None:
    from tierline.logs import configure, get_logger

    configure(settings.log_level, settings.log_format, **context)
    if _database_source is not None:
        get_logger("tierline.cli").info("database", source=_database_source)


def with_database(settings: Settings, *, quiet: bool = False) -> Settings:
    """Settings with a database URL: ``TIERLINE_DATABASE_URL``, else ``DATABASE_URL``, else
    the embedded server of the ``tierline up`` running in the data folder. Nothing but
    ``tierline up`` starts an embedded server: a replica with a missing secret must not
    quietly get a private database that no other replica sees, so it exits 2 instead."""
    global _database_source
    if settings.database_url is not None:
        _database_source = (
            env_name("database_url") if os.environ.get(env_name("database_url")) else FALLBACK_URL
        )
        return settings
    url = _running_up_database(settings.data_dir)
    if url is None:
        fail(
            f"no database: {env_name('database_url')} is not set (nor {FALLBACK_URL}) and no "
            f"`tierline up` runs in {os.path.abspath(settings.data_dir)} to join; set "
            f"{env_name('database_url')}=postgresql://user@host:5432/db, or start `tierline up` "
            "for a local one"
        )
    _database_source = f"the embedded PostgreSQL of `tierline up` in {settings.data_dir}"
    if not quiet:
        click.echo(f"tierline: using {_database_source} ({url})", err=True)
    return settings.model_copy(update={"database_url": SecretStr(url)})


def with_embedded_database(settings: Settings) -> tuple[Settings, str | None]:
    """For ``tierline up``: the configured database, else an embedded server of its own
    in the data folder (started, or joined if it runs); the embedded URL, if any."""
    if settings.database_url is not None:
        return with_database(settings), None
    from tierline import embedded

    try:
        url = embedded.start(settings.data_dir)
        version = embedded.server_version()
    except TierlineError as exc:
        fail(str(exc))
    click.echo(
        f"tierline: embedded {version} at {url} "
        f"(data in {os.path.join(settings.data_dir, 'pgdata')})",
        err=True,
    )
    global _database_source
    _database_source = "embedded"
    return settings.model_copy(update={"database_url": SecretStr(url)}), url


FALLBACK_URL = FALLBACK_DATABASE_URL
_database_source: str | None = None  # which variable (or server) gave the URL, for the log


def _running_up_database(data_dir: str) -> str | None:
    """The embedded server's URL of a ``tierline up`` running in ``data_dir``, if any."""
    from tierline.supervisor import send_control

    try:
        reply = asyncio.run(asyncio.wait_for(send_control(data_dir, {}), timeout=5))
    except (OSError, TimeoutError, ValueError):
        return None
    url = reply.get("embedded_database_url")
    return url if isinstance(url, str) else None


def load_app(spec: str) -> Any:
    from tierline.app import App

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        app = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise AppLoadError(f"{env_name('app')}={spec!r}: cannot load it: {exc}") from None
    if not isinstance(app, App):
        raise AppLoadError(
            f"{env_name('app')}={spec!r} is a {type(app).__name__}, not a tierline.App"
        )
    return app


def run_async(main: Callable[[], Any]) -> int:
    from tierline.lifecycle import uvloop_policy

    uvloop_policy()
    try:
        return int(asyncio.run(main()) or 0)
    except TierlineError as exc:
        fail(str(exc), 1)


def env_option(*decls: str, field: str, help: str, **kw: Any) -> Callable[[Any], Any]:
    """A flag that overrides ``TIERLINE_<FIELD>``; validated by Settings, not click."""
    return click.option(
        *decls, field, default=None, envvar=env_name(field), show_envvar=True, help=help, **kw
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tierline")
def main() -> None:
    """Tierline: web and worker tiers that scale independently on PostgreSQL."""


# -- the tiers ----------------------------------------------------------------------------------
@main.command()
@env_option("--app", field="app", help="Application as module:attribute.")
@env_option("--host", field="web_host", help="Address to listen on.")
@env_option("--port", field="web_port", help="Port to listen on.")
@env_option("--web-app", field="web_app", help="The application's ASGI app (module:attribute).")
@click.option(
    "--reuse-port", is_flag=True, help="Share the port with other replicas (SO_REUSEPORT)."
)
@click.option(
    "--fd",
    type=click.IntRange(0),
    default=None,
    hidden=True,
    help="Serve on this inherited listening socket (how `tierline up` starts web replicas).",
)
def web(
    app: str | None,
    web_host: str | None,
    web_port: str | None,
    web_app: str | None,
    reuse_port: bool,
    fd: int | None,
) -> None:
    """Run one web-tier replica (HTTP API, SSE, metrics, dashboard; the application's
    own routes with TIERLINE_WEB_APP)."""
    settings = with_database(
        load_settings(app=app, web_host=web_host, web_port=web_port, web_app=web_app)
    )
    setup_logging(settings, tier="web", pid=os.getpid())
    from tierline.web.host import load_asgi_app
    from tierline.web_tier import WebTier

    application = _app_or_fail(settings)
    sock = None
    if fd is not None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            fail(f"--fd {fd}: not a socket this process inherited ({exc.strerror or exc})")
    try:
        hosted = load_asgi_app(settings.web_app) if settings.web_app else None
        tier = WebTier(application, settings, sock=sock, reuse_port=reuse_port, web_app=hosted)
    except TierlineError as exc:
        fail(str(exc))
    sys.exit(run_async(tier.run))


@main.command()
@env_option("--app", field="app", help="Application as module:attribute.")
@env_option("--queues", field="worker_queues", help="Comma-separated queues.")
@env_option("--concurrency", field="worker_concurrency", help="Jobs run at once.")
@env_option(
    "--metrics-port",
    field="worker_metrics_port",
    help="Port of /metrics, /healthz, /readyz (0: any free port).",
)
def worker(
    app: str | None,
    worker_queues: str | None,
    worker_concurrency: str | None,
    worker_metrics_port: str | None,
) -> None:
    """Run one worker-tier replica."""
    settings = with_database(
        load_settings(
            app=app,
            worker_queues=worker_queues,
            worker_concurrency=worker_concurrency,
            worker_metrics_port=worker_metrics_port,
        )
    )
    setup_logging(settings, tier="worker", pid=os.getpid())
    from tierline.worker_tier import WorkerTier

    application = _app_or_fail(settings)
    sys.exit(run_async(lambda: WorkerTier(application, settings).run()))


def _app_or_fail(settings: Settings) -> Any:
    try:
        return load_app(settings.app)
    except TierlineError as exc:
        fail(str(exc))


@main.command()
@env_option("--web", field="up_web", help="Web replicas (default 1).")
@env_option("--workers", field="up_workers", help="Worker replicas (default 2).")
@env_option("--app", field="app", help="Application as module:attribute.")
@env_option("--port", field="web_port", help="Port of the web tier.")
def up(up_web: str | None, up_workers: str | None, app: str | None, web_port: str | None) -> None:
    """Run the whole system: database (embedded unless TIERLINE_DATABASE_URL is set),
    migrations, web and worker replicas as separate processes."""
    settings, embedded_url = with_embedded_database(
        load_settings(app=app, web_port=web_port, up_web=up_web, up_workers=up_workers)
    )
    web_n, workers_n = settings.up_web, settings.up_workers
    setup_logging(settings, tier="supervisor", pid=os.getpid())
    _app_or_fail(settings)
    from tierline.supervisor import Supervisor

    run_async(lambda: _migrate(settings, quiet=True))
    env = {k: v for k, v in os.environ.items()}
    env[env_name("database_url")] = settings.dsn()
    if app:
        env[env_name("app")] = app
    if web_port:
        env[env_name("web_port")] = web_port
    host = settings.web_host
    click.echo(
        f"tierline: web tier  http://{host}:{settings.web_port}/  "
        f"(API /v1/jobs, docs /docs, metrics /metrics)",
        err=True,
    )
    if workers_n:
        first = settings.worker_metrics_port
        ports = f"{first}..{first + workers_n - 1} (one per replica)" if first else "any free port"
        click.echo(
            f"tierline: workers   metrics on {settings.worker_metrics_host}:{ports}", err=True
        )
    click.echo(
        f"tierline: {web_n} web and {workers_n} worker replicas; "
        "`tierline scale worker=N` to change; Ctrl+C stops",
        err=True,
    )
    sys.exit(
        run_async(
            lambda: Supervisor(
                settings, env, web=web_n, workers=workers_n, embedded_url=embedded_url
            ).run()
        )
    )


@main.command()
@click.argument("changes", nargs=-1, required=True)
@env_option("--data-dir", field="data_dir", help="Data folder of the running `tierline up`.")
def scale(changes: tuple[str, ...], data_dir: str | None) -> None:
    """Change the replica count of a running `tierline up`: `tierline scale worker=4 web=2`."""
    settings = load_settings(data_dir=data_dir)
    wanted: dict[str, int] = {}
    for change in changes:
        tier, _, n = change.partition("=")
        tier = {"workers": "worker", "webs": "web"}.get(tier, tier)
        if tier not in ("web", "worker") or not n.isdigit():
            fail(f"expected web=N or worker=N, got {change!r}")
        wanted[tier] = int(n)
    from tierline.supervisor import send_control

    try:
        reply = asyncio.run(send_control(settings.data_dir, {"scale": wanted}))
    except (OSError, TimeoutError) as exc:
        fail(f"no running `tierline up` in {settings.data_dir} ({exc})", 1)
    for result in reply.get("results", []):
        if "error" in result:
            fail(result["error"])
        click.echo(f"{result['tier']}: {result['from']} -> {result['to']} replicas")


# -- database -----------------------------------------------------------------------------------
@main.command()
@click.option(
    "--check", is_flag=True, help="Only check the schema version; exit 1 if it needs migrating."
)
@click.option(
    "--create-roles",
    "create_roles",
    is_flag=True,
    default=None,
    envvar=env_name("create_roles"),
    show_envvar=True,
    help="Then create (if missing) and grant the least-privilege web and worker roles; "
    "passwords from TIERLINE_WEB_ROLE_PASSWORD / TIERLINE_WORKER_ROLE_PASSWORD, else "
    "generated for new roles and printed once. Idempotent: run it after every migration.",
)
@env_option("--web-role", field="web_role", help="Role of the web tier.")
@env_option("--worker-role", field="worker_role", help="Role of the worker tier.")
def migrate(
    check: bool, create_roles: bool | None, web_role: str | None, worker_role: str | None
) -> None:
    """Apply the schema migrations (safe to run from many replicas at once)."""
    settings = load_settings(web_role=web_role, worker_role=worker_role, create_roles=create_roles)
    if check and settings.create_roles:
        fail("--check and --create-roles do not go together")
    settings = with_database(settings)
    setup_logging(settings, tier="migrate")
    sys.exit(run_async(lambda: _migrate(settings, check=check, create_roles=settings.create_roles)))


async def _migrate(
    settings: Settings, *, check: bool = False, quiet: bool = False, create_roles: bool = False
) -> int:
    from tierline import migrations
    from tierline.database import connect

    conn = await connect(
        settings.direct_dsn(), settings, attempts=5, application_name="tierline-migrate"
    )
    try:
        if check:
            version = await migrations.check(conn)
            click.echo(f"schema is current (version {version})")
            return 0
        application = _app_or_fail(settings)
        own = application.migrations
        app_migrations = (application.name, migrations.in_folder(own)) if own else None
        applied = await migrations.migrate(conn, app_migrations)
        if not quiet or applied:
            if applied:
                for m in applied:
                    click.echo(f"applied migration {m.version:04d}_{m.name}", err=quiet)
            else:
                click.echo(f"schema is current (version {migrations.LATEST})")
        if create_roles:
            from tierline import roles

            for outcome in await roles.create_roles(conn, settings):
                _echo_role(outcome)
    finally:
        await conn.close()
    return 0


def _echo_role(outcome: Any) -> None:
    from tierline import roles

    var = env_name(f"{outcome.tier}_role_password")
    how = {
        "generated": "password generated, shown once (store it now, e.g. in the "
        f"{outcome.tier} tier's secret): {outcome.generated_password}",
        "set": f"password set from {var}",
        "kept": f"password unchanged (set {var} to change it)",
    }[outcome.password]
    click.echo(f"role {outcome.role}: {'created' if outcome.created else 'exists'}; {how}")
    click.echo(f"role {outcome.role}: granted {roles.ALLOWS[outcome.tier]}")
    for warning in outcome.warnings:
        click.echo(f"tierline: warning: {warning}", err=True)


# -- planning and configuration -----------------------------------------------------------------
@main.command()
@click.option(
    "--web", "web_n", type=click.IntRange(0, 10_000), required=True, help="Planned web replicas."
)
@click.option(
    "--workers",
    "workers_n",
    type=click.IntRange(0, 10_000),
    required=True,
    help="Planned worker replicas.",
)
@env_option(
    "--db-max-connections",
    field="db_max_connections",
    help="The budget; default: read from the server.",
)
@click.option(
    "--cores",
    type=click.FloatRange(0.01, 4096),
    default=None,
    help="CPU cores per replica (default: what this machine allows).",
)
def plan(web_n: int, workers_n: int, db_max_connections: str | None, cores: float | None) -> None:
    """Print the connection arithmetic of a deployment (and of the read replica, with
    TIERLINE_DATABASE_READ_URL); exit 1 when it does not fit either server."""
    from tierline import planning

    settings = load_settings(db_max_connections=db_max_connections)
    server = None
    if settings.db_max_connections is None:
        if settings.database_url is None:
            fail(
                "give --db-max-connections, or set TIERLINE_DATABASE_URL to read the "
                "server's max_connections"
            )
        server = run_async_value(lambda: planning.read_server_limits(settings))
    read_server = None
    if settings.read_dsn() is not None and settings.db_read_max_connections is None:
        read_server = run_async_value(lambda: planning.read_server_limits(settings, read=True))
    result = planning.plan(
        settings, web=web_n, workers=workers_n, cores=cores, server=server, read_server=read_server
    )
    click.echo(planning.render(result))
    sys.exit(0 if result.fits else 1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the recommendation as JSON.")
def recommend(as_json: bool) -> None:
    """Recommend replicas per tier from live statistics, with the reasoning: inputs,
    formula, result and the limit that bound it (reads the database directly)."""
    from tierline.recommend_report import render
    from tierline.recommender import live

    settings = with_database(load_settings(), quiet=True)
    result = run_async_value(lambda: live(settings))
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        click.echo(render(result, settings))


def run_async_value(main: Callable[[], Any]) -> Any:
    try:
        return asyncio.run(main())
    except TierlineError as exc:
        fail(str(exc), 1)


@main.command()
@click.option(
    "--tier",
    type=click.Choice(["web", "worker"]),
    default=None,
    help="Only the settings this tier uses.",
)
@click.option("--markdown", is_flag=True, help="Print the reference (docs/configuration.md).")
def config(tier: str | None, markdown: bool) -> None:
    """Print the effective settings and where each came from (secrets redacted)."""
    from tierline import settings_doc

    if markdown:
        click.echo(settings_doc.markdown(), nl=False)
        return
    settings = load_settings()
    click.echo(settings_doc.table(settings, os.environ, tier))


@main.group()
def docs() -> None:
    """Generated reference documents."""


@docs.command("metrics")
def docs_metrics() -> None:
    """Print docs/metrics.md, generated from the metric registry."""
    from tierline import metrics_doc

    click.echo(metrics_doc.markdown(), nl=False)


@docs.command("configuration")
def docs_configuration() -> None:
    """Print docs/configuration.md, generated from the settings object."""
    from tierline import settings_doc

    click.echo(settings_doc.markdown(), nl=False)


# -- client commands ----------------------------------------------------------------------------
@main.command()
@click.argument("kind")
@click.option("--args", "args_json", default="{}", help="Arguments as a JSON object.")
@click.option("--queue", default=None)
@env_option(
    "--url", field="url", help="Web tier URL (default: http://TIERLINE_WEB_HOST:TIERLINE_WEB_PORT)."
)
@env_option("--key", field="api_key", help="API key.")
def enqueue(
    kind: str, args_json: str, queue: str | None, url: str | None, api_key: str | None
) -> None:
    """Enqueue a job through the web tier and print it."""
    from tierline.client import Client, ClientError

    settings = load_settings(url=url, api_key=api_key)
    try:
        args = json.loads(args_json)
    except ValueError as exc:
        fail(f"--args is not JSON: {exc}")
    body: dict[str, Any] = {"kind": kind, "args": args}
    if queue:
        body["queue"] = queue
    try:
        with Client(_url(settings), api_key=_key(settings)) as client:
            click.echo(json.dumps(client.enqueue(body), indent=2))
    except ClientError as exc:
        fail(str(exc), 1)


@main.command()
@click.argument("job_id", type=click.IntRange(1))
@env_option(
    "--url",
    field="url",
    help="Web tier URL, or several comma-separated to fail over between "
    "(default: http://TIERLINE_WEB_HOST:TIERLINE_WEB_PORT).",
)
@env_option("--key", field="api_key", help="API key.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
def watch(job_id: int, url: str | None, api_key: str | None, as_json: bool) -> None:
    """Follow a job's events until it finishes (resumes after disconnects)."""
    from tierline.client import Client, ClientError

    settings = load_settings(url=url, api_key=api_key)
    last = None
    try:
        urls = [u.strip().rstrip("/") for u in _url(settings).split(",") if u.strip()]
        with Client(urls, api_key=_key(settings)) as client:
            for ev in client.follow(job_id):
                last = ev
                if as_json:
                    click.echo(json.dumps(ev.payload()))
                else:
                    inner = ev.data.get("data") if isinstance(ev.data, dict) else ev.data
                    click.echo(f"{ev.at}  #{ev.seq:<4} {ev.type:<10} {_describe(inner)}")
    except ClientError as exc:
        fail(str(exc), 1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0 if last is None or last.type == "succeeded" else 1)


@main.command()
@env_option("--url", field="url", help="Web tier URL.")
@env_option("--key", field="api_key", help="API key.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
def schedules(url: str | None, api_key: str | None, as_json: bool) -> None:
    """List the periodic jobs: spec, last enqueued slot and its job, next run."""
    rows = _client_call(url, api_key, lambda c: c.schedules())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        last = f"{r['last_slot']} (job {r['last_job_id']}, {r['last_job_state']})"
        click.echo(
            f"{r['name']:<24} {r['spec']:<22} {r['timezone']:<12} next {r['next_run']}  "
            f"last {last if r['last_slot'] else '-'}"
        )


@main.group()
def queue() -> None:
    """Pause, resume or limit a queue, live, for every worker replica."""


def _queue_change(name: str, changes: dict[str, Any], url: str | None, key: str | None) -> None:
    click.echo(
        json.dumps(_client_call(url, key, lambda c: c.change_queue(name, changes)), indent=2)
    )


def _client_call(url: str | None, api_key: str | None, call: Callable[[Any], Any]) -> Any:
    from tierline.client import Client, ClientError

    settings = load_settings(url=url, api_key=api_key)
    try:
        with Client(_url(settings), api_key=_key(settings)) as client:
            return call(client)
    except ClientError as exc:
        fail(str(exc), 1)


_URL = env_option("--url", field="url", help="Web tier URL.")
_KEY = env_option("--key", field="api_key", help="API key (admin scope).")


@queue.command("pause")
@click.argument("name")
@_URL
@_KEY
def queue_pause(name: str, url: str | None, api_key: str | None) -> None:
    """Stop starting NAME's jobs (running ones finish; enqueueing still works)."""
    _queue_change(name, {"paused": True}, url, api_key)


@queue.command("resume")
@click.argument("name")
@_URL
@_KEY
def queue_resume(name: str, url: str | None, api_key: str | None) -> None:
    """Start NAME's jobs again."""
    _queue_change(name, {"paused": False}, url, api_key)


@queue.command("set")
@click.argument("name")
@click.option("--max-running", help="Jobs running at once, cluster-wide ('none': no limit).")
@click.option("--rate-limit", help="Jobs started per interval: 20/s, 100/m ('none': no limit).")
@click.option("--partition-by", help="Limits per value of this argument ('none': whole queue).")
@click.option("--reset", is_flag=True, help="Back to the code's declaration (app.queue) first.")
@_URL
@_KEY
def queue_set(
    name: str,
    max_running: str | None,
    rate_limit: str | None,
    partition_by: str | None,
    reset: bool,
    url: str | None,
    api_key: str | None,
) -> None:
    """Change NAME's limits; fields not given stay as they are."""
    changes: dict[str, Any] = {"reset": True} if reset else {}
    for field, value in (("rate_limit", rate_limit), ("partition_by", partition_by)):
        if value is not None:
            changes[field] = None if value.lower() == "none" else value
    if max_running is not None:
        try:
            changes["max_running"] = None if max_running.lower() == "none" else int(max_running)
        except ValueError:
            fail(f"--max-running {max_running!r}: a number or 'none'")
    if not changes:
        fail("give --max-running, --rate-limit, --partition-by or --reset")
    _queue_change(name, changes, url, api_key)


def _describe(data: Any) -> str:
    if not isinstance(data, dict):
        return json.dumps(data)
    if "fraction" in data:
        frac = data.get("fraction")
        pct = f"{frac * 100:5.1f}% " if isinstance(frac, int | float) else ""
        return f"{pct}{data.get('message', '')}"
    return json.dumps(data, separators=(",", ":"))[:200]


def _url(settings: Settings) -> str:
    if settings.url:
        return settings.url
    host = "127.0.0.1" if settings.web_host in ("0.0.0.0", "::") else settings.web_host
    return f"http://{host}:{settings.web_port}"


def _key(settings: Settings) -> str | None:
    return settings.api_key.get_secret_value() if settings.api_key else None


if __name__ == "__main__":  # pragma: no cover
    main()
