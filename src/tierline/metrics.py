"""Prometheus metrics of both tiers, in base units, with low-cardinality labels.

Every metric is declared here with its meaning and what to do when it is high;
``docs/metrics.md`` is generated from ``CATALOGUE`` (``tierline docs metrics``) and
checked in CI. This module imports nothing from the tiers: they push values into it,
or register callbacks read at scrape time.

Why this module is long: it is the catalogue, one declaration per metric with its help
text and its "when high" hint; the docs are generated from it, so it stays in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)


@dataclass(frozen=True)
class Doc:
    name: str
    type: str
    labels: tuple[str, ...]
    meaning: str
    when_high: str
    tier: str  # "web", "worker" or "both"


CATALOGUE: list[Doc] = []


def _doc(
    name: str, type_: str, labels: Iterable[str], meaning: str, when_high: str, tier: str
) -> None:
    CATALOGUE.append(Doc(name, type_, tuple(labels), meaning, when_high, tier))


def counter(name: str, meaning: str, labels: Iterable[str], when_high: str, tier: str) -> Counter:
    _doc(name + "_total", "counter", labels, meaning, when_high, tier)
    return Counter(name, meaning, list(labels), registry=REGISTRY)


def gauge(name: str, meaning: str, labels: Iterable[str], when_high: str, tier: str) -> Gauge:
    _doc(name, "gauge", labels, meaning, when_high, tier)
    return Gauge(name, meaning, list(labels), registry=REGISTRY)


def histogram(
    name: str,
    meaning: str,
    labels: Iterable[str],
    when_high: str,
    tier: str,
    buckets: Iterable[float],
) -> Histogram:
    _doc(name, "histogram", labels, meaning, when_high, tier)
    return Histogram(name, meaning, list(labels), registry=REGISTRY, buckets=list(buckets))


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)

# -- build ------------------------------------------------------------------------------
BUILD = Info(
    "tierline_build", "Version of Tierline and of the Python running it.", registry=REGISTRY
)
_doc(
    "tierline_build_info",
    "gauge",
    ("version", "python"),
    "Build information (always 1).",
    "Not a saturation signal; use it to see which version runs where.",
    "both",
)

# -- HTTP (web) ---------------------------------------------------------------------------
HTTP_DURATION = histogram(
    "tierline_http_request_duration_seconds",
    "Time to answer an HTTP request (SSE streams: time to the first byte).",
    ("route", "method", "status"),
    "p99 rising with load: add web replicas (see docs/scaling-playbook.md); rising without "
    "load: check tierline_db_pool_wait_seconds_total and the database.",
    "web",
    LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = gauge(
    "tierline_http_requests_in_flight",
    "HTTP requests being answered now (SSE excluded).",
    (),
    "Sustained growth means requests arrive faster than they finish: add web replicas or "
    "look for a slow dependency.",
    "web",
)
SSE_ACTIVE = gauge(
    "tierline_sse_streams_active",
    "Open server-sent-event streams on this replica.",
    (),
    "Near TIERLINE_SSE_MAX_STREAMS new streams get 503: add web replicas or raise the cap.",
    "web",
)
SSE_EVENTS = counter(
    "tierline_sse_events_sent",
    "Events sent to SSE clients.",
    (),
    "Informational: the fan-out volume of this replica.",
    "web",
)
SSE_DROPPED = counter(
    "tierline_sse_slow_clients_disconnected",
    "Streams closed because the client read too slowly (it can resume).",
    (),
    "Clients on slow links or a replica short of CPU; raise TIERLINE_SSE_BUFFER_EVENTS or add "
    "web replicas.",
    "web",
)

# -- jobs -----------------------------------------------------------------------------------
JOBS_ENQUEUED = counter(
    "tierline_jobs_enqueued",
    "Jobs enqueued by this process (repeated idempotency keys excluded).",
    ("queue",),
    "Compare with tierline_jobs_finished_total: arrivals above completions grow the backlog.",
    "web",
)
JOBS_FINISHED = counter(
    "tierline_jobs_finished",
    "Attempts finished by this worker, by outcome (succeeded, failed, cancelled, retried).",
    ("queue", "outcome"),
    "A rising failed or retried share points at the handlers or their dependencies, not at "
    "capacity.",
    "worker",
)
JOB_DURATION = histogram(
    "tierline_job_duration_seconds",
    "Run time of one attempt, from start to finish.",
    ("queue",),
    "Longer jobs need more slots for the same arrival rate (Little's law): add worker "
    "replicas or concurrency.",
    "worker",
    JOB_BUCKETS,
)
JOB_PICKUP = histogram(
    "tierline_job_pickup_delay_seconds",
    "Time from a job being due to a worker claiming it.",
    ("queue",),
    "Jobs wait for free slots: add worker replicas (or concurrency if CPU allows).",
    "worker",
    (*LATENCY_BUCKETS, 30.0, 60.0, 300.0),
)
WORKER_SLOTS = gauge(
    "tierline_worker_slots",
    "Job slots of this worker, busy or free.",
    ("state",),
    "All slots busy while the queue is deep: add worker replicas.",
    "worker",
)

# -- executors (src/tierline/executors/) ---------------------------------------------------
OVERRUNNING_THREADS = gauge(
    "tierline_worker_overrunning_threads",
    "Threads still running jobs already finished (timed out or cancelled hard); each "
    "keeps its slot until it returns, since Python cannot stop a thread.",
    (),
    "Above 0 for long: handlers ignore their timeouts and hold slots; move them to "
    "executor='process' (killed on timeout) or restart the replica.",
    "worker",
)
CHILDREN = gauge(
    "tierline_worker_children",
    "Child processes of the process executor, running a job (busy) or idle.",
    ("state",),
    "All busy while process-executor jobs wait: add worker replicas (children follow the "
    "usable cores, TIERLINE_WORKER_CHILDREN).",
    "worker",
)
CHILDREN_RECYCLED = counter(
    "tierline_worker_children_recycled",
    "Child processes replaced between jobs, by reason (max_jobs, memory).",
    ("reason",),
    "A high memory rate: handlers leak or grow; check TIERLINE_WORKER_MAX_CHILD_MEMORY_MB "
    "against tierline_worker_child_max_resident_memory_bytes.",
    "worker",
)
CHILDREN_KILLED = counter(
    "tierline_worker_children_killed",
    "Child processes killed mid-job, by reason (timeout, cancelled: past the cancel grace, "
    "shutdown: past the shutdown grace).",
    ("reason",),
    "timeout rising: jobs outgrow their timeout; raise it or make the jobs smaller.",
    "worker",
)
CHILDREN_DIED = counter(
    "tierline_worker_children_died",
    "Child processes that exited unexpectedly (a crash, os._exit, an out-of-memory "
    "kill); each fails only the attempt it ran and is replaced.",
    (),
    "Any increase: a handler crashes its process; see the failed attempts' errors.",
    "worker",
)
WORKER_RSS = gauge(
    "tierline_worker_resident_memory_bytes",
    "Resident memory of the worker process (children excluded).",
    (),
    "Growing without bound: a leak in the worker or in thread-executor handlers.",
    "worker",
)
CHILDREN_RSS = gauge(
    "tierline_worker_children_resident_memory_bytes",
    "Resident memory of all child processes of the process executor together.",
    (),
    "With the worker's, what the replica's memory limit must hold.",
    "worker",
)
CHILD_MAX_RSS = gauge(
    "tierline_worker_child_max_resident_memory_bytes",
    "Resident memory of the largest child process.",
    (),
    "Near the pod's limit / children: set TIERLINE_WORKER_MAX_CHILD_MEMORY_MB to recycle "
    "children before the kernel kills one.",
    "worker",
)
QUEUE_DEPTH = gauge(
    "tierline_queue_depth",
    "Jobs per queue and state (shared statistics, cached a few seconds).",
    ("queue", "state"),
    "available growing: workers cannot keep up; add worker replicas.",
    "both",
)
QUEUE_OLDEST = gauge(
    "tierline_queue_oldest_age_seconds",
    "Age of the oldest due job waiting in a queue.",
    ("queue",),
    "Above your latency SLO: add worker replicas; see 'Oldest job too old' in the playbook.",
    "both",
)
QUEUE_PAUSED = gauge(
    "tierline_queue_paused",
    "1 while a queue is paused (PATCH /v1/queues/{name}, tierline queue pause): its jobs "
    "wait, enqueueing still works.",
    ("queue",),
    "1 longer than an incident needs: resume it (tierline queue resume NAME).",
    "both",
)
QUEUE_UNSERVED = gauge(
    "tierline_queue_unserved",
    "1 while jobs wait in a queue that no live worker replica serves "
    "(TIERLINE_WORKER_QUEUES of every worker leaves it out).",
    ("queue",),
    "Any 1: those jobs never run; add the queue to a worker's TIERLINE_WORKER_QUEUES.",
    "both",
)
WORKER_QUEUE_HANDLERS = gauge(
    "tierline_worker_queue_handlers",
    "Job kinds registered with this queue as their default, for each queue this worker "
    "serves (TIERLINE_WORKER_QUEUES).",
    ("queue",),
    "0: a queue this worker polls that no handler of its application sends jobs to by "
    "default (a typo in TIERLINE_WORKER_QUEUES, or the wrong TIERLINE_APP); it gets only "
    "jobs enqueued to it by name.",
    "worker",
)
REPLICAS = gauge(
    "tierline_replicas",
    "Live replicas per tier, from the replica registry.",
    ("tier",),
    "Fewer than deployed: replicas are dying or not ready (check /readyz reasons).",
    "both",
)
RECOMMENDED = gauge(
    "tierline_recommended_replicas",
    "Replicas Tierline recommends per tier.",
    ("tier",),
    "Above tierline_replicas: scale out (or let KEDA/HPA do it).",
    "both",
)
SERVER_CONNECTIONS = gauge(
    "tierline_db_server_connections",
    "Client connections on the PostgreSQL server now.",
    (),
    "Near tierline_db_server_max_connections: the database is close to refusing connections.",
    "both",
)
SERVER_MAX_CONNECTIONS = gauge(
    "tierline_db_server_max_connections",
    "The PostgreSQL server's max_connections setting.",
    (),
    "Not a saturation signal: the denominator of tierline_db_server_connections (alert at 0.8).",
    "both",
)
BUDGET = gauge(
    "tierline_db_budget_connections",
    "The global connection budget (kind=total), and what live replicas claimed (claimed).",
    ("kind",),
    "claimed near total: new replicas will wait not-ready; see the pool sizing guide.",
    "both",
)


# -- the read replica (web tier, TIERLINE_DATABASE_READ_URL; src/tierline/read_routing.py) ----
REPLICA_LAG = gauge(
    "tierline_db_replica_lag_seconds",
    "Replay lag of the read replica (target=replica), by the primary's clock: the age of "
    "the oldest write it has not applied yet; NaN while it cannot be measured.",
    ("target",),
    "Above TIERLINE_READ_MAX_LAG_S reads go to the primary: look at the replica's I/O and "
    "CPU, long queries on it (hot_standby_feedback), the network.",
    "web",
)
READ_TARGET = gauge(
    "tierline_db_read_target",
    "Where this web replica sends its reads now: 1 for the target in use, 0 for the other.",
    ("target",),
    "target=primary at 1 for long with a replica configured: the replica lags or is "
    "down, and the primary carries the reads (see the warning in the log).",
    "web",
)
READ_FALLBACKS = counter(
    "tierline_db_read_fallbacks",
    "Reads meant for the replica that the primary answered, by reason (lag, unreachable, "
    "error, not_replayed: a row or event the replica had not applied yet).",
    ("reason",),
    "lag or unreachable rising: the replica cannot keep up or is down; not_replayed "
    "alone is clients reading what they just wrote, which is expected.",
    "web",
)
QUERY_DURATION = histogram(
    "tierline_db_query_duration_seconds",
    "Time of one read of the web tier (jobs, listings, statistics, stream catch-up), by the "
    "server that answered it.",
    ("target",),
    "replica slower than primary: the replica is short of resources; both rising: see "
    "the pool metrics and the database.",
    "web",
    LATENCY_BUCKETS,
)


# -- pools: read from psycopg_pool at scrape time ---------------------------------------------
@dataclass(frozen=True)
class PoolMetric:
    """One pool metric: documented in ``CATALOGUE`` and exported by ``PoolCollector``
    from the same declaration, so the help text and the docs cannot drift apart."""

    name: str  # as exposed (counters end in _total)
    type: str  # "gauge" or "counter"
    meaning: str
    when_high: str
    key: str = ""  # the ``pool_snapshot`` value it exports
    states: tuple[str, ...] = ()  # one sample per state instead, each its snapshot key

    @property
    def labels(self) -> tuple[str, ...]:
        return ("tier", "target", "state") if self.states else ("tier", "target")


POOL_METRICS = (
    PoolMetric(
        "tierline_db_pool_connections",
        "gauge",
        "Pool connections in use or idle; target=primary for the tier's pool, "
        "target=replica for the web tier's read pool (TIERLINE_DATABASE_READ_URL).",
        "in_use near max: the pool is saturated; see utilisation.",
        states=("in_use", "idle"),
    ),
    PoolMetric(
        "tierline_db_pool_max_connections",
        "gauge",
        "The pool's effective maximum after caps.",
        "Below requested: a cap applied; see logs.",
        "max",
    ),
    PoolMetric(
        "tierline_db_pool_requested_max_connections",
        "gauge",
        "The pool maximum asked for by TIERLINE_<TIER>_DB_POOL_MAX (target=replica: "
        "TIERLINE_WEB_DB_READ_POOL_MAX).",
        "Differs from max: the request was capped (CPU or budget).",
        "requested_max",
    ),
    PoolMetric(
        "tierline_db_pool_waiting_requests",
        "gauge",
        "Callers waiting for a pool connection now.",
        "Above 0 for long: the pool is too small for the load, or queries are slow.",
        "waiting",
    ),
    PoolMetric(
        "tierline_db_pool_waits_total",
        "counter",
        "Requests that had to wait for a connection.",
        "Rising rate: the pool is saturated.",
        "waits",
    ),
    PoolMetric(
        "tierline_db_pool_wait_seconds_total",
        "counter",
        "Total time spent waiting for connections.",
        "rate() over waits rate is the mean wait; high means saturation.",
        "wait_s",
    ),
    PoolMetric(
        "tierline_db_pool_timeouts_total",
        "counter",
        "Requests that gave up waiting (503 on web, retry on worker).",
        "Any increase: the pool or database is saturated; act now.",
        "timeouts",
    ),
    PoolMetric(
        "tierline_db_pool_utilization_ratio",
        "gauge",
        "Connections in use / effective maximum.",
        ">= 0.9 for 15 min: raise the pool within the budget, or add replicas.",
        "utilization",
    ),
)
for _m in POOL_METRICS:
    _doc(_m.name, _m.type, _m.labels, _m.meaning, _m.when_high, "both")


class PoolCollector(Collector):
    """Reads the live pools' statistics at scrape time (``get_stats`` omits zeros): the
    primary's pool (``target="primary"``) and, on a web replica with a read replica, the
    read pool (``target="replica"``)."""

    def __init__(self) -> None:
        self.source: Callable[[], list[dict[str, Any]]] = lambda: []

    def collect(self) -> Iterable[Metric]:
        snaps = self.source()
        if not snaps:
            return []
        out: list[Metric] = []
        for m in POOL_METRICS:
            family = GaugeMetricFamily if m.type == "gauge" else CounterMetricFamily
            # (a counter family takes the name with or without _total; it exposes _total)
            metric = family(m.name, m.meaning, labels=list(m.labels))
            for snap in snaps:
                labels = [snap["tier"], snap.get("target", "primary")]
                if m.states:
                    for state in m.states:
                        metric.add_metric([*labels, state], snap[state])
                else:
                    metric.add_metric(labels, snap[m.key])
            out.append(metric)
        return out


POOLS = PoolCollector()
REGISTRY.register(POOLS)


def pool_snapshot(
    tier: str, stats: dict[str, int], requested_max: int, target: str = "primary"
) -> dict[str, Any]:
    """psycopg_pool ``get_stats()`` in Tierline's terms (base units, zeros filled in)."""
    size = stats.get("pool_size", 0)
    available = stats.get("pool_available", 0)
    pool_max = stats.get("pool_max", 0)
    in_use = max(0, size - available)
    return {
        "tier": tier,
        "target": target,
        "size": size,
        "in_use": in_use,
        "idle": available,
        "max": pool_max,
        "requested_max": requested_max,
        "waiting": stats.get("requests_waiting", 0),
        "waits": stats.get("requests_queued", 0),
        "wait_s": stats.get("requests_wait_ms", 0) / 1000.0,
        "timeouts": stats.get("requests_errors", 0),
        "utilization": in_use / pool_max if pool_max else 0.0,
    }
