"""Django's Tasks framework on Tierline (``tierline.contrib.django``): a minimal Django
project (``tests/django_project``) enqueues through ``django.tasks`` (or the backport on
Django < 6), a real ``tierline worker`` runs the tasks, and results read back through
Django's API; enqueues inside ``transaction.atomic()`` join its transaction."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")

from tests.helpers import ROOT
from tierline.testing.databases import query
from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

SETTINGS = "tests.django_project.settings"


@pytest.fixture(scope="module")
def django_db(module_db: str) -> Iterator[str]:
    """Django set up on the module's database (settings are per process: once)."""
    import django
    from django.db import connections

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DJANGO_SETTINGS_MODULE", SETTINGS)
        mp.setenv("DJANGO_DATABASE_URL", module_db)
        django.setup()
        query(module_db, "CREATE TABLE django_notes (id serial PRIMARY KEY, text text)")
        try:
            yield module_db
        finally:
            connections.close_all()


@pytest.fixture(scope="module")
def worker(django_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One ``tierline worker`` running Django's tasks for the whole module."""
    cluster = Cluster(
        django_db,
        tmp_path_factory.mktemp("django"),
        TIERLINE_APP="tierline.contrib.django.worker:app",
        TIERLINE_WORKER_QUEUES="default,reports",
        DJANGO_SETTINGS_MODULE=SETTINGS,
        DJANGO_DATABASE_URL=django_db,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    try:
        proc, url = cluster.worker()
        cluster.wait_ready(url, proc)
        yield cluster
    finally:
        cluster.close()


def finished(result: Any, cluster: Cluster) -> Any:
    """Refresh ``result`` through Django's API until the worker has finished it."""

    def done() -> bool:
        result.refresh()
        return bool(result.is_finished)

    wait_for(done, 30, f"task {result.id} to finish\n{cluster.procs[0].tail()}")
    return result


def rolled_back(work: Any) -> None:
    """Run ``work`` in ``transaction.atomic()``, then fail so the block rolls back."""
    from django.db import transaction

    with transaction.atomic():
        work()
        raise RuntimeError("roll back")


def test_task_runs_on_a_worker_and_its_result_reads_back(worker: Cluster) -> None:
    from tests.django_project.tasks import add
    from tierline.contrib.django.framework import TaskResultStatus, default_task_backend

    result = add.enqueue(2, 3)
    assert result.status == TaskResultStatus.READY and result.enqueued_at is not None
    (job,) = query(worker.db_url, "SELECT * FROM tierline.jobs WHERE id = %s", [int(result.id)])
    assert (job["kind"], job["queue"], job["args"]["task"]) == (
        "django.task",
        "default",
        "tests.django_project.tasks.add",
    )
    finished(result, worker)
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 5 and result.attempts == 1
    assert result.started_at <= result.finished_at
    again = default_task_backend.get_result(result.id)
    assert again.return_value == 5 and again.args == [2, 3]
    assert add.get_result(result.id).status == TaskResultStatus.SUCCESSFUL


def test_a_failing_task_is_failed_with_its_error(worker: Cluster) -> None:
    from tests.django_project.tasks import PaymentDeclined, decline
    from tierline.contrib.django.framework import TaskResultStatus

    result = finished(decline.enqueue("4242"), worker)
    assert result.status == TaskResultStatus.FAILED
    (error,) = result.errors
    assert error.exception_class is PaymentDeclined
    assert "card 4242 declined" in error.traceback and ", in decline" in error.traceback
    assert result.attempts == 1  # Django's tasks do not retry unless MAX_ATTEMPTS says so
    with pytest.raises(ValueError, match="failed"):
        result.return_value  # noqa: B018 - the property raises


def test_context_async_tasks_and_the_orm_in_the_worker(worker: Cluster) -> None:
    from tests.django_project.tasks import double, note, whoami

    me = finished(whoami.enqueue(tag="x"), worker)
    assert me.return_value == {"id": me.id, "attempt": 1, "tag": "x"}
    assert finished(double.enqueue(21), worker).return_value == 42
    counted = finished(note.enqueue("from the worker"), worker)
    assert counted.return_value >= 1 and counted.task.queue_name == "reports"


def test_max_attempts_lets_a_task_run_again(worker: Cluster) -> None:
    from tests.django_project.tasks import flaky
    from tierline.contrib.django.framework import TaskResultStatus

    once = finished(flaky.enqueue(), worker)  # the default backend: one attempt
    assert once.status == TaskResultStatus.FAILED
    assert once.errors[0].exception_class_path == "tierline.outcomes.Retry"
    twice = finished(flaky.using(backend="retrying").enqueue(), worker)
    assert twice.status == TaskResultStatus.SUCCESSFUL, twice.errors
    assert (twice.return_value, twice.attempts, twice.task.backend) == (2, 2, "retrying")


def test_queue_priority_and_run_after_map_onto_the_job(worker: Cluster) -> None:
    from django.utils import timezone

    from tests.django_project.tasks import add
    from tierline.contrib.django.framework import TaskResultStatus

    later = timezone.now() + timedelta(hours=1)
    result = add.using(queue_name="reports", priority=7, run_after=later).enqueue(1, 1)
    (job,) = query(worker.db_url, "SELECT * FROM tierline.jobs WHERE id = %s", [int(result.id)])
    assert (job["queue"], job["priority"], job["state"]) == ("reports", 7, "scheduled")
    assert abs((job["run_at"] - later).total_seconds()) < 0.001
    read = add.get_result(result.id)
    assert read.status == TaskResultStatus.READY
    assert (read.task.queue_name, read.task.priority) == ("reports", 7)
    assert read.task.run_after == later


def test_enqueue_in_an_atomic_block_commits_with_its_writes(worker: Cluster) -> None:
    from django.db import connection, transaction

    from tests.django_project.tasks import add
    from tierline.contrib.django.framework import TaskResultDoesNotExist

    def visible(job_id: str) -> bool:  # from another connection, as a worker sees it
        return bool(query(worker.db_url, "SELECT 1 FROM tierline.jobs WHERE id = %s", [job_id]))

    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("INSERT INTO django_notes (text) VALUES ('with its job')")
        kept = add.enqueue(1, 2)
        assert add.get_result(kept.id).status.value == "READY"  # read in the transaction
        assert not visible(kept.id)
        try:
            with transaction.atomic():  # a savepoint: its enqueue goes with it
                undone = add.enqueue(3, 4)
                raise RuntimeError("roll the savepoint back")
        except RuntimeError:
            pass
    assert visible(kept.id) and not visible(undone.id)
    assert finished(kept, worker).return_value == 3

    gone: list[Any] = []
    with pytest.raises(RuntimeError, match="roll back"):
        rolled_back(lambda: gone.append(add.enqueue(5, 6)))
    assert not visible(gone[0].id)
    with pytest.raises(TaskResultDoesNotExist):
        add.get_result(gone[0].id)


def test_enqueue_on_commit_creates_no_job_on_rollback(worker: Cluster) -> None:
    from django.db import transaction

    from tests.django_project.tasks import add

    def count() -> int:
        rows = query(
            worker.db_url, "SELECT count(*) AS n FROM tierline.jobs WHERE args->'args' = '[40, 2]'"
        )
        return int(rows[0]["n"])

    with pytest.raises(RuntimeError, match="roll back"):
        rolled_back(lambda: transaction.on_commit(partial(add.enqueue, 40, 2)))
    assert count() == 0
    with transaction.atomic():
        transaction.on_commit(partial(add.enqueue, 40, 2))
        assert count() == 0  # not enqueued until the commit
    assert count() == 1


def test_unknown_result_ids_do_not_exist(django_db: str) -> None:
    from tierline.contrib.django.framework import TaskResultDoesNotExist, default_task_backend

    for missing in ("999999", "not-a-number"):
        with pytest.raises(TaskResultDoesNotExist):
            default_task_backend.get_result(missing)


def test_the_worker_module_names_the_missing_settings(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-c", "import tierline.contrib.django.worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "DJANGO_SETTINGS_MODULE" in done.stderr
