"""Which database a command uses. Only ``tierline up`` starts an embedded PostgreSQL; the
other commands take ``TIERLINE_DATABASE_URL``, else ``DATABASE_URL``, else join the
embedded server of a ``tierline up`` running in the same data folder, else exit 2 with
one line naming the variable (a pod with a missing secret must not get a private
database that no worker sees)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tierline.testing.processes import Proc
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e


def bare_env(**extra: str) -> dict[str, str]:
    """This process's environment without any database variable."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TIERLINE_") and k != "DATABASE_URL"
    }
    env.update({"TIERLINE_STARTUP_JITTER_S": "0", **extra})
    return env


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierline", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", [["web"], ["worker"], ["migrate"], ["recommend"]])
def test_no_database_exits_2_naming_the_variable(tmp_path: Path, command: list[str]) -> None:
    done = run(command, bare_env(), tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "TIERLINE_DATABASE_URL" in lines[0] and "tierline up" in lines[0], lines[0]
    assert not (tmp_path / ".tierline" / "pgdata").exists(), "it started a database"


def test_database_url_is_the_fallback(tmp_path: Path, db_url: str) -> None:
    done = run(["migrate", "--check"], bare_env(DATABASE_URL=db_url), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "schema is current" in done.stdout
    assert "DATABASE_URL" in done.stderr, done.stderr  # the log says which variable


def test_commands_join_the_database_of_a_running_up(tmp_path: Path) -> None:
    up = Proc(["up", "--web", "0", "--workers", "0"], bare_env(), tmp_path / "up.log", cwd=tmp_path)
    try:
        wait_for(
            lambda: (tmp_path / ".tierline" / "control.sock").exists() or not up.alive(),
            120,
            "tierline up to start its embedded database",
        )
        assert up.alive(), up.tail()
        done = run(["migrate", "--check"], bare_env(), tmp_path)
        assert done.returncode == 0, done.stderr
        assert "schema is current" in done.stdout
        assert "embedded PostgreSQL of `tierline up`" in done.stderr, done.stderr
    finally:
        code = up.interrupt()
    assert code == 0, up.tail()
