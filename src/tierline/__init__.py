"""Tierline: a Python application as independently scalable web and worker tiers on
PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"

from tierline.app import App  # noqa: E402
from tierline.context import JobContext  # noqa: E402
from tierline.errors import TierlineError  # noqa: E402
from tierline.jobs import Job, JobRequest, State  # noqa: E402
from tierline.outcomes import Cancel, Retry  # noqa: E402

__all__ = ["App", "Cancel", "Job", "JobContext", "JobRequest", "Retry", "State",
           "TierlineError", "__version__"]
