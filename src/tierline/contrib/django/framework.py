"""Which Tasks framework this process has: ``django.tasks`` (Django >= 6.0) or, on older
Django, the ``django-tasks`` backport (``django_tasks``, the same API under another name).

Both are imported by name at run time, so the rest of this package is written once and
the type checker sees ``Any`` for the framework's objects (Django ships no types).
"""

from __future__ import annotations

import importlib
from typing import Any


def _load() -> tuple[str, Any, Any, Any, Any, Any, Any]:
    try:
        base = importlib.import_module("django.tasks.base")
    except ImportError:  # Django < 6.0: the backport
        name = "django_tasks"
        base = importlib.import_module(f"{name}.base")
        normalize = importlib.import_module(f"{name}.utils").normalize_json
    else:
        name = "django.tasks"
        normalize = importlib.import_module("django.utils.json").normalize_json
    return (
        name,
        importlib.import_module(name),
        base,
        importlib.import_module(f"{name}.backends.base"),
        importlib.import_module(f"{name}.exceptions"),
        importlib.import_module(f"{name}.signals"),
        normalize,
    )


FRAMEWORK, _tasks, _base, _backends, _exceptions, _signals, normalize_json = _load()

Task: Any = _base.Task
TaskContext: Any = _base.TaskContext
TaskError: Any = _base.TaskError
TaskResult: Any = _base.TaskResult
TaskResultStatus: Any = _base.TaskResultStatus
task: Any = _base.task
task_backends: Any = _tasks.task_backends
default_task_backend: Any = _tasks.default_task_backend
BaseTaskBackend: Any = _backends.BaseTaskBackend
TaskResultDoesNotExist: Any = _exceptions.TaskResultDoesNotExist
task_enqueued: Any = _signals.task_enqueued
task_started: Any = _signals.task_started
task_finished: Any = _signals.task_finished
