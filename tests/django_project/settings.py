"""Settings of the test Django project: the test database from ``DJANGO_DATABASE_URL``
(which the test sets for itself and for the worker it starts), Tierline as the tasks
backend."""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict

_db = conninfo_to_dict(os.environ["DJANGO_DATABASE_URL"])

SECRET_KEY = "tests-only"
USE_TZ = True
INSTALLED_APPS: list[str] = []
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.get("dbname", ""),
        "HOST": _db.get("host", ""),
        "PORT": str(_db.get("port", "")),
        "USER": _db.get("user", ""),
        "PASSWORD": _db.get("password", ""),
    }
}
TASKS = {
    "default": {
        "BACKEND": "tierline.contrib.django.TierlineBackend",
        "QUEUES": ["default", "reports"],
    },
    "retrying": {  # the same queue, tasks run up to twice
        "BACKEND": "tierline.contrib.django.TierlineBackend",
        "OPTIONS": {"MAX_ATTEMPTS": 2},
    },
}
