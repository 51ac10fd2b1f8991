"""Tierline: a Python application as independently scalable web and worker tiers on
PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"

from tierline.app import App
from tierline.context import JobContext
from tierline.errors import TierlineError
from tierline.jobs import Job, JobRequest, State
from tierline.outcomes import Cancel, Retry
from tierline.unique import Unique

__all__ = [
    "App",
    "Cancel",
    "Job",
    "JobContext",
    "JobRequest",
    "Retry",
    "State",
    "TierlineError",
    "Unique",
    "__version__",
]
