"""Observability acceptance: metrics checked by Prometheus's own tools, scraped by a real
Prometheus, counters equal to the database, the alert rules and the Grafana dashboard.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT
from tests.jobs_app import TEST_APP
from tierline import metrics
from tierline.testing.databases import query
from tierline.testing.http import enqueue_batch
from tierline.testing.ports import free_port
from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "tierline.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (scripts/system-deps: Debian 'prometheus')"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (scripts/system-deps: Debian 'prometheus')"
)

# Everything the catalogue declares, with the series names a histogram adds.
KNOWN = {d.name for d in metrics.CATALOGUE} | {
    d.name + suffix
    for d in metrics.CATALOGUE
    if d.type == "histogram"
    for suffix in ("_bucket", "_count", "_sum")
}


# -- helpers ----------------------------------------------------------------------------------
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[str, Samples]:
    """The text of ``url``/metrics and its samples by (name, labels)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def db_outcomes(db_url: str) -> dict[str, int]:
    rows = query(db_url, "SELECT state, count(*) AS n FROM tierline.jobs GROUP BY state")
    return {r["state"]: int(r["n"]) for r in rows}


@contextlib.contextmanager
def prometheus(tmp: Path, web: str, workers: list[str]) -> Iterator[str]:
    """A real Prometheus scraping the given tiers every second, with Tierline's alert rules."""
    assert PROMETHEUS is not None
    port = free_port()

    def hostport(url: str) -> str:
        return url.removeprefix("http://")

    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "tierline-web", "static_configs": [{"targets": [hostport(web)]}]},
            {
                "job_name": "tierline-worker",
                "static_configs": [{"targets": [hostport(w) for w in workers]}],
            },
        ],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200,
            30,
            "prometheus to be ready",
        )
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def promql(url: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", []) if t.get("expr")]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\btierline_[a-z_]+", expr))


# -- static checks: rules and dashboard -----------------------------------------------------
@needs_promtool
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_alerts_and_dashboard_use_declared_metrics_and_playbook_sections() -> None:
    """A renamed metric breaks this test, not a dashboard in production."""
    rules_text = ALERTS.read_text()
    used = metric_names(rules_text) | {n for e in dashboard_exprs() for n in metric_names(e)}
    assert used - KNOWN == set(), f"not in tierline.metrics: {sorted(used - KNOWN)}"
    sections = re.findall(r"runbook_url: docs/scaling-playbook\.md#([a-z0-9-]+)", rules_text)
    assert len(sections) == rules_text.count("- alert:"), "every alert links to the playbook"
    playbook = ROOT / "docs" / "scaling-playbook.md"
    if not playbook.exists():
        pytest.skip("docs/scaling-playbook.md not written yet")
    anchors = {  # GitHub's heading anchors
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", playbook.read_text(), flags=re.M)
    }
    assert set(sections) - anchors == set(), "runbook links to missing playbook sections"


def test_grafana_dashboard_model() -> None:
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    titles = {p["title"] for p in panels}
    for wanted in (
        "Web latency",
        "Pool utilisation per tier",
        "Queue depth",
        "Oldest due job per queue",
        "Throughput",
        "Replicas and recommendations",
        "SSE streams and requests in flight",
    ):
        assert wanted in titles
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
    exprs = " ".join(dashboard_exprs())
    assert (
        "histogram_quantile(0.99" in exprs
        and "tierline_http_request_duration_seconds_bucket" in exprs
    )
    assert "tierline_jobs_finished_total" in exprs and "outcome" in exprs


# -- real processes ---------------------------------------------------------------------------
@needs_promtool
@pytest.mark.e2e
def test_metrics_of_both_tiers_pass_promtool_check(cluster: Cluster) -> None:
    web, url = cluster.web(TIERLINE_APP=TEST_APP)
    worker, wurl = cluster.worker(TIERLINE_APP=TEST_APP)
    cluster.wait_ready(url, web)
    cluster.wait_ready(wurl, worker)
    with httpx.Client(timeout=10) as client:
        jobs = [{"kind": "add", "args": {"a": i}} for i in range(20)]
        jobs += [{"kind": "give_up", "args": {}}, {"kind": "retry_later", "args": {"delay": 0.1}}]
        ids = enqueue_batch(url, jobs, chunk=500, client=client)
        client.get(f"{url}/v1/jobs/{ids[0]}")
        client.get(f"{url}/v1/jobs/999999999")  # a 404 in the histogram too
    wait_for(
        lambda: db_outcomes(cluster.db_url) == {"succeeded": 21, "cancelled": 1},
        30,
        "the jobs to finish",
    )
    wait_for(
        lambda: total(scrape(wurl)[1], "tierline_job_duration_seconds_count") == 23,
        10,
        "the worker's histograms to count every attempt (one retried)",
    )
    for tier, target in (("web", url), ("worker", wurl)):
        text, samples = scrape(target)
        checked = promtool("check", "metrics", stdin=text)
        assert checked.returncode == 0, f"{tier}: {checked.stdout}{checked.stderr}"
        assert (checked.stdout + checked.stderr).strip() == "", f"{tier}: lint problems"
        assert total(samples, "tierline_db_pool_utilization_ratio", tier=tier) >= 0
        assert total(samples, "tierline_replicas", tier="worker") == 1
        assert total(samples, "tierline_db_server_max_connections") > 0
        assert total(samples, "tierline_db_budget_connections", kind="total") > 0
    _, web_samples = scrape(url)
    assert total(web_samples, "tierline_http_request_duration_seconds_count") > 0
    assert total(web_samples, "tierline_jobs_enqueued_total") == 22
    _, worker_samples = scrape(wurl)
    assert total(worker_samples, "tierline_job_pickup_delay_seconds_count") == 23


@needs_prometheus
@pytest.mark.e2e
@pytest.mark.slow
def test_prometheus_scrapes_both_tiers_and_counters_match_the_database(
    cluster: Cluster, db_url: str, tmp_path: Path
) -> None:
    """1,000 jobs with mixed outcomes: the counters of every process add up to the database."""
    env = {"TIERLINE_APP": TEST_APP, "TIERLINE_WORKER_CONCURRENCY": "20"}
    web, url = cluster.web(**env)
    workers = [cluster.worker(**env) for _ in range(2)]
    cluster.wait_ready(url, web)
    for proc, wurl in workers:
        cluster.wait_ready(wurl, proc)
    worker_urls = [w for _, w in workers]

    jobs: list[dict[str, Any]] = []
    jobs += [{"kind": "add", "args": {"a": i}} for i in range(680)]
    jobs += [{"kind": "flaky", "args": {"succeed_on": 2}} for _ in range(100)]  # 1 retry
    jobs += [{"kind": "flaky", "args": {"succeed_on": 99}} for _ in range(100)]  # fails, 3 tries
    jobs += [{"kind": "give_up", "args": {"reason": "not needed"}} for _ in range(100)]
    keyed = [{"kind": "add", "args": {"a": i}, "idempotency_key": f"obs-{i}"} for i in range(20)]
    with prometheus(tmp_path, url, worker_urls) as prom, httpx.Client(timeout=30) as client:
        enqueue_batch(url, jobs, chunk=500, client=client)
        for job in keyed:  # one at a time, then again: the repeats create nothing
            assert client.post(f"{url}/v1/jobs", json=job).status_code == 202
        for job in keyed:
            assert client.post(f"{url}/v1/jobs", json=job).status_code == 200
        created = len(jobs) + len(keyed)
        assert query(db_url, "SELECT count(*) AS n FROM tierline.jobs")[0]["n"] == created

        def all_final() -> bool:
            got = db_outcomes(db_url)
            return sum(got.get(s, 0) for s in ("succeeded", "failed", "cancelled")) == created

        wait_for(all_final, 120, f"{created} jobs to reach a final state")
        expected = db_outcomes(db_url)
        assert expected == {"succeeded": 800, "failed": 100, "cancelled": 100}
        retries = query(
            db_url, "SELECT sum(attempt - 1) AS n FROM tierline.jobs WHERE attempt > 0"
        )[0]["n"]
        assert retries == 100 * 1 + 100 * 2

        def counted() -> dict[str, float]:
            per_worker = [scrape(w)[1] for w in worker_urls]
            return {
                outcome: sum(
                    total(s, "tierline_jobs_finished_total", outcome=outcome) for s in per_worker
                )
                for outcome in ("succeeded", "failed", "cancelled", "retried")
            }

        want = {**{k: float(v) for k, v in expected.items()}, "retried": float(retries)}
        # A counter moves just after its transaction commits: wait for the last ones.
        wait_for(lambda: counted() == want, 30, "the workers' counters to settle")
        assert counted() == want
        assert all(total(scrape(w)[1], "tierline_jobs_finished_total") > 0 for w in worker_urls), (
            "both workers ran jobs"
        )
        assert total(scrape(url)[1], "tierline_jobs_enqueued_total") == created

        # Prometheus sees the same numbers, from both tiers. Each target's first good scrape
        # lands on its own schedule (a loaded machine can miss the 1 s scrape timeout once).
        def depth_jobs() -> set[str]:
            rows = promql(prom, 'tierline_queue_depth{queue="default", state="succeeded"}')
            return {r["metric"]["job"] for r in rows}

        wait_for(
            lambda: depth_jobs() == {"tierline-web", "tierline-worker"},
            30,
            "tierline_queue_depth in Prometheus from both tiers",
        )
        wait_for(
            lambda: [
                r
                for r in promql(prom, 'tierline_queue_depth{queue="default", state="succeeded"}')
                if float(r["value"][1]) == 800
            ],
            30,
            "the queue statistics to reach Prometheus",
        )
        up = promql(prom, "up")
        assert len(up) == 3 and all(r["value"][1] == "1" for r in up), up

        def prom_succeeded() -> float:
            result = promql(prom, 'sum(tierline_jobs_finished_total{outcome="succeeded"})')
            return float(result[0]["value"][1]) if result else -1.0

        wait_for(lambda: prom_succeeded() == 800, 30, "Prometheus to sum the counters to 800")
        enq = promql(prom, "sum(tierline_jobs_enqueued_total)")
        assert enq and float(enq[0]["value"][1]) == created

        # Every dashboard query is valid PromQL and evaluates against real series.
        for expr in dashboard_exprs():
            concrete = expr.replace("$__rate_interval", "30s").replace("$queue", ".*")
            promql(prom, concrete)

        # The alert rules evaluate without error on real data (e.g. no many-to-many matching).
        def rules_healthy() -> list[dict[str, Any]]:
            groups = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if rules and all(r["health"] == "ok" for r in rules) else []

        rules = wait_for(rules_healthy, 30, "the alert rules to evaluate")
        assert len(rules) == ALERTS.read_text().count("- alert:")
        firing = {r["name"] for r in rules if r["state"] != "inactive"}
        assert "TierlineNoWorkers" not in firing


@pytest.mark.e2e
def test_killed_worker_is_dead_within_two_heartbeats(cluster: Cluster) -> None:
    heartbeat_s, lease_s = 1.0, 2.0  # dead once silent for two heartbeat periods
    env = {
        "TIERLINE_APP": TEST_APP,
        "TIERLINE_HEARTBEAT_S": str(heartbeat_s),
        "TIERLINE_REPLICA_LEASE_S": str(lease_s),
    }
    web, url = cluster.web(**env)
    worker, wurl = cluster.worker(**env)
    cluster.wait_ready(url, web)
    cluster.wait_ready(wurl, worker)

    def mine(snap: dict[str, Any]) -> dict[str, Any]:
        return next(r for r in snap["replicas"] if r["pid"] == worker.pid)

    with httpx.Client(timeout=5) as client:

        def cl() -> dict[str, Any]:
            snap: dict[str, Any] = client.get(f"{url}/v1/cluster").json()
            return snap

        wait_for(lambda: mine(cl())["status"] == "alive", 10, "the worker to register")
        worker.kill()
        # From the kill: at most one heartbeat period since the last heartbeat, two more
        # until the lease is over; plus the web tier's one-second cache and some slack.
        snap = wait_for(
            lambda: (s := cl()) and mine(s)["status"] == "dead" and s,
            2 * heartbeat_s + 1 + 2,
            "the killed worker to show as dead",
        )
        dead = mine(snap)
        assert dead["alive"] is False and dead["ready"] is False
        assert dead["heartbeat_age_s"] >= lease_s
        assert dead["claimed_connections"] == 0
        assert snap["tiers"]["worker"] == {**snap["tiers"]["worker"], "alive": 0, "dead": 1}
        assert any(r["tier"] == "web" and r["status"] == "alive" for r in snap["replicas"])
        _, samples = scrape(url)
        assert total(samples, "tierline_replicas", tier="worker") == 0


# -- counting rules ---------------------------------------------------------------------------
async def test_job_cancelled_while_handed_back_at_shutdown_is_counted(
    pool: Any, db_url: str
) -> None:
    """A cancel request the worker had not seen yet when it shut down: the hand-back
    finishes the job as cancelled, and that outcome is counted like any other."""
    from tests.conftest import make_settings
    from tests.jobs_app import app
    from tierline.jobs import JobRequest
    from tierline.queue import Queue
    from tierline.worker import Worker

    queue = Queue(app, pool)
    job, _ = await queue.enqueue(JobRequest(kind="stubborn", args={"seconds": 30}))
    worker = Worker(app, make_settings(db_url), pool, "00000000-0000-0000-0000-0000000000c1")
    assert await worker.claim(1) == 1
    async with pool.connection() as conn:  # no NOTIFY, no renewal yet: the worker is unaware
        await conn.execute(
            "UPDATE tierline.jobs SET cancel_requested_at = now() WHERE id = %s", (job.id,)
        )

    def cancelled() -> float:
        labels = {"queue": job.queue, "outcome": "cancelled"}
        return metrics.REGISTRY.get_sample_value("tierline_jobs_finished_total", labels) or 0.0

    before = cancelled()
    await worker.drain(0.1)
    assert (await queue.get(job.id)).state == "cancelled"
    assert cancelled() == before + 1
