"""Tierline as a backend for Django's Tasks framework (``docs/django.md``).

In the Django settings::

    TASKS = {"default": {"BACKEND": "tierline.contrib.django.TierlineBackend"}}

and on the worker tier ``TIERLINE_APP=tierline.contrib.django.worker:app`` with
``DJANGO_SETTINGS_MODULE`` set. Importing this package does not set Django up; the worker
module does, once per process.
"""

from __future__ import annotations

from tierline.contrib.django.backend import TierlineBackend

__all__ = ["TierlineBackend"]
