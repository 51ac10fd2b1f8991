"""The test application with flow control declared in code: a schedule every 2 s and a
queue with a declared limit (tests/test_flow_e2e.py)."""

from __future__ import annotations

from tests.jobs_app import app as jobs
from tierline import App

app = App("flow-tests")
app.include(jobs)
app.schedule("record", every_s=2, args={"token": "tick"}, name="tick")
app.queue("declared", max_running=3)
FLOW_APP = "tests.flow_app:app"
