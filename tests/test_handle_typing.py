"""mypy (strict) sees a handler's parameters on its handle: ``send.enqueue(user_id="x")``
for ``def send(user_id: int)`` is a type error, the right call is not, with or without a
``ctx`` first parameter."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mypy import api

PROGRAM = textwrap.dedent(
    """
    from tierline import App, JobContext

    app = App("typing")

    @app.job()
    def send(user_id: int) -> None: ...

    @app.job()
    async def report(ctx: JobContext, user_id: int, verbose: bool = False) -> int:
        return user_id

    async def ok() -> None:
        await send.enqueue(user_id=1)
        send.enqueue_sync(user_id=2)
        await send.using(queue="emails", delay_s=5).enqueue(user_id=3)
        await report.enqueue(user_id=4, verbose=True)
        send(user_id=5)

    async def wrong() -> None:
        await send.enqueue(user_id="x")  # error
        await report.enqueue(user_id=4, verbose="yes")  # error
        send.enqueue_sync(nobody=1)  # error
    """
)


def test_mypy_sees_the_handler_parameters(tmp_path: Path) -> None:
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    out, err, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(program)]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    lines = sorted({int(line.split(":")[1]) for line in errors})
    expected = [n for n, text in enumerate(PROGRAM.splitlines(), 1) if text.endswith("# error")]
    assert lines == expected, out + err
    assert status == 1
