"""Settings: typed, frozen, and errors that name the variable."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from pydantic import ValidationError

from tests.helpers import ROOT
from tierline.errors import SettingsError
from tierline.settings import Settings


def test_defaults_are_valid() -> None:
    s = Settings.from_env({})
    assert s.web_port == 8000
    assert s.queues() == ["default"]
    with pytest.raises(ValidationError, match="frozen"):
        s.web_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        (
            "TIERLINE_WORKER_CONCURRENCY",
            "abc",
            "TIERLINE_WORKER_CONCURRENCY='abc': expected a whole number",
        ),
        (
            "TIERLINE_WORKER_CONCURRENCY",
            "0",
            "TIERLINE_WORKER_CONCURRENCY='0': expected a number at least 1",
        ),
        (
            "TIERLINE_WEB_PORT",
            "70000",
            "TIERLINE_WEB_PORT='70000': expected a number at most 65535",
        ),
        ("TIERLINE_LOG_LEVEL", "loud", "TIERLINE_LOG_LEVEL='loud': expected one of"),
        ("TIERLINE_APP", "nocolon", "TIERLINE_APP='nocolon': expected module:attribute"),
        ("TIERLINE_WORKER_QUEUES", " , ", "TIERLINE_WORKER_QUEUES"),
        ("TIERLINE_DB_POOL_TIMEOUT_S", "-1", "TIERLINE_DB_POOL_TIMEOUT_S='-1'"),
    ],
)
def test_invalid_values_name_the_variable(var: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({var: value})
    assert expected in str(info.value)


def test_min_above_max_names_both() -> None:
    with pytest.raises(
        SettingsError, match="TIERLINE_WEB_DB_POOL_MIN=9 is larger than TIERLINE_WEB_DB_POOL_MAX=4"
    ):
        Settings.from_env({"TIERLINE_WEB_DB_POOL_MIN": "9"})


def test_secret_values_are_not_echoed() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {
                "TIERLINE_DATABASE_URL": "postgresql://u:hunter2@h/db",
                "TIERLINE_DB_MAX_CONNECTIONS": "0",
            }
        )
    assert "hunter2" not in str(info.value)


def run_cli(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`tierline COMMAND` with only ``env`` (and a minimal PATH) in its environment."""
    return subprocess.run(
        [sys.executable, "-m", "tierline", *command],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", [["worker"], ["web"], ["migrate"], ["up"]])
def test_cli_exits_2_with_one_line_and_no_traceback(command: list[str]) -> None:
    proc = run_cli(command, {"TIERLINE_WORKER_CONCURRENCY": "lots"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tierline: error: TIERLINE_WORKER_CONCURRENCY='lots': expected a whole number"
    ]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("command", "variable"),
    [
        (["web"], "TIERLINE_WEB_PORT"),
        (["worker"], "TIERLINE_WORKER_METRICS_PORT"),
        (["up", "--workers", "0"], "TIERLINE_WEB_PORT"),
    ],
)
def test_a_port_in_use_is_one_line_naming_the_variable(
    command: list[str], variable: str, db_url: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "TIERLINE_DATABASE_URL": db_url,
            "TIERLINE_APP": "tests.jobs_app:app",
            "TIERLINE_WEB_HOST": "127.0.0.1",
            "TIERLINE_WORKER_METRICS_HOST": "127.0.0.1",
            "TIERLINE_STARTUP_JITTER_S": "0",
            variable: str(port),
        }
        proc = run_cli(command, env)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tierline: error: cannot listen on 127.0.0.1:{port} ({variable}): Address already in use"
    )
    assert "Traceback" not in proc.stderr + proc.stdout
