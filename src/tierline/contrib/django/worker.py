"""``TIERLINE_APP=tierline.contrib.django.worker:app``: the worker tier runs Django tasks.

Importing this module sets Django up (``django.setup()``, from ``DJANGO_SETTINGS_MODULE``)
once for the process, before any task module is imported, as ``manage.py`` would.
"""

from __future__ import annotations

import os

import django
from django.conf import settings

from tierline.errors import AppLoadError

if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
    raise AppLoadError(
        "tierline.contrib.django.worker needs DJANGO_SETTINGS_MODULE (e.g. mysite.settings)"
    )
django.setup()

from tierline.contrib.django.jobs import app  # noqa: E402 - tasks import models: set up first

__all__ = ["app"]
