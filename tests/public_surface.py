"""The public surface of Tierline as data: exported names, settings (env vars), metric
names, HTTP routes and CLI commands with their flags. ``test_public_surface`` compares it
with ``tests/public_surface.json`` so that a refactoring cannot change what users, scripts
and dashboards depend on without the change showing up in review.

``python -m tests.public_surface > tests/public_surface.json`` records a deliberate change.
"""

from __future__ import annotations

import json
from typing import Any

import click


def surface() -> dict[str, Any]:
    import tierline
    from tierline import metrics
    from tierline.cli import main
    from tierline.settings import Settings, env_name

    return {
        "exports": sorted(tierline.__all__),
        "settings": sorted(env_name(name) for name in Settings.model_fields),
        "metrics": sorted(f"{d.name}{{{','.join(d.labels)}}}" for d in metrics.CATALOGUE),
        "routes": _routes(),
        "cli": _commands(main, "tierline"),
    }


def _routes() -> list[str]:
    """Every route of the web tier: the OpenAPI paths and the ones kept out of it."""
    from tierline.web.app import create_app

    api = create_app(_runtime())
    schema = {
        f"{method.upper()} {path}"
        for path, item in api.openapi()["paths"].items()
        for method in item
    }
    hidden = {
        f"{method} {route.path}"
        for route in _flatten(api.routes)
        for method in getattr(route, "methods", None) or ["MOUNT"]
        if method != "HEAD"
    }
    return sorted(schema | hidden)


def _flatten(routes: Any) -> list[Any]:
    out = []
    for route in routes:
        router = getattr(route, "router", None) or getattr(route, "original_router", None)
        inner = getattr(router, "routes", None)
        out += _flatten(inner) if inner is not None else [route]
    return out


def _runtime() -> Any:
    from tierline.demo import app as demo
    from tierline.settings import Settings
    from tierline.web_tier import WebTier

    return WebTier(demo, Settings()).rt


def _commands(command: click.Command, path: str) -> dict[str, list[str]]:
    out = {path: sorted(opt for p in command.params for opt in _names(p))}
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            out.update(_commands(sub, f"{path} {name}"))
    return out


def _names(param: click.Parameter) -> list[str]:
    if isinstance(param, click.Option):
        envvar = getattr(param, "envvar", None)
        return [*param.opts, *param.secondary_opts, *([f"${envvar}"] if envvar else [])]
    return [f"<{param.name}>"]


if __name__ == "__main__":
    print(json.dumps(surface(), indent=1, sort_keys=True))
