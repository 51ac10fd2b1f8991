"""What users, scripts and dashboards depend on does not change by accident: exported
names, env vars, metrics, routes and CLI flags match ``tests/public_surface.json``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.public_surface import surface

RECORDED = Path(__file__).with_name("public_surface.json")


def test_public_surface_is_unchanged() -> None:
    recorded = json.loads(RECORDED.read_text())
    assert surface() == recorded, (
        "the public surface changed; if that is deliberate, record it with "
        "`python -m tests.public_surface > tests/public_surface.json`"
    )
