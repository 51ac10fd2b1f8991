"""The budget's arithmetic, without a database: usable cores from cgroup v1 and v2 files
and CPU affinity, the CPU cap, fitting a pool into what the budget has left, and
``tierline plan``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import ROOT
from tierline import budget, planning
from tierline.budget import Cap, PoolPlan
from tierline.cores import Cores, usable_cores
from tierline.settings import Settings
from tierline.testing.processes import tierline_env


def cgroup_v2(tmp: Path, path: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 hierarchy: ``files`` maps a folder under the root to its cpu.max."""
    root = tmp / "cgroup"
    for folder, cpu_max in files.items():
        d = root / folder.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(cpu_max + "\n")
    root.mkdir(exist_ok=True)
    proc = tmp / "proc-self-cgroup"
    proc.write_text(f"0::{path}\n")
    return root, proc


def cgroup_v1(
    tmp: Path, path: str, files: dict[str, tuple[int, int]], mount: str = "cpu,cpuacct"
) -> tuple[Path, Path]:
    """A cgroup v1 hierarchy: ``files`` maps a folder to (cfs_quota_us, cfs_period_us)."""
    root = tmp / "cgroup"
    base = root / mount
    base.mkdir(parents=True)
    for folder, (quota, period) in files.items():
        d = base / folder.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (d / "cpu.cfs_period_us").write_text(f"{period}\n")
    controllers = "cpu,cpuacct" if mount in ("cpu,cpuacct", "cpuacct,cpu") else "cpu"
    proc = tmp / "proc-self-cgroup"
    proc.write_text(f"12:memory:{path}\n4:{controllers}:{path}\n1:name=systemd:{path}\n0::{path}\n")
    return root, proc


# -- usable cores ---------------------------------------------------------------------------
def test_v2_quota_of_half_a_cpu_is_one_usable_core(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, "/kubepods/pod1/c1", {"/kubepods/pod1/c1": "50000 100000"})
    cores = usable_cores(root, proc, affinity=64, host=64)
    assert cores == Cores(usable=1, host=64, source="cgroup v2 cpu.max", quota=0.5)


def test_v2_fractional_quota_rounds_up(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, "/pod", {"/pod": "250000 100000"})
    cores = usable_cores(root, proc, affinity=16, host=16)
    assert (cores.usable, cores.quota) == (3, 2.5)


def test_v2_unlimited_uses_affinity(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, "/user.slice", {"/user.slice": "max 100000"})
    cores = usable_cores(root, proc, affinity=6, host=8)
    assert cores == Cores(usable=6, host=8, source="affinity", quota=None)


def test_v2_tightest_ancestor_wins(tmp_path: Path) -> None:
    # The pod's limit sits on the parent; the container's own cgroup has a looser one.
    root, proc = cgroup_v2(
        tmp_path,
        "/kubepods/pod1/c1",
        {"/kubepods/pod1": "100000 100000", "/kubepods/pod1/c1": "400000 100000"},
    )
    cores = usable_cores(root, proc, affinity=32, host=32)
    assert (cores.usable, cores.source, cores.quota) == (1, "cgroup v2 cpu.max", 1.0)


def test_v2_namespaced_container_reads_the_mount_root(tmp_path: Path) -> None:
    # Without a cgroup namespace /proc/self/cgroup names a path the container's mount
    # does not have; its own limit is then at the mount's root.
    root, proc = cgroup_v2(tmp_path, "/kubepods/burstable/podX/abc", {"/": "150000 100000"})
    cores = usable_cores(root, proc, affinity=8, host=8)
    assert (cores.usable, cores.quota) == (2, 1.5)


def test_v1_cfs_quota(tmp_path: Path) -> None:
    root, proc = cgroup_v1(tmp_path, "/docker/abc", {"/docker/abc": (150000, 100000)})
    cores = usable_cores(root, proc, affinity=8, host=8)
    assert cores == Cores(usable=2, host=8, source="cgroup v1 cfs quota", quota=1.5)


def test_v1_separate_cpu_mount(tmp_path: Path) -> None:
    # This machine's layout: /sys/fs/cgroup/cpu on its own, "1:cpu:/path".
    root, proc = cgroup_v1(tmp_path, "/job", {"/": (-1, 100000), "/job": (50000, 100000)}, "cpu")
    cores = usable_cores(root, proc, affinity=2, host=2)
    assert (cores.usable, cores.source, cores.quota) == (1, "cgroup v1 cfs quota", 0.5)


def test_v1_no_quota(tmp_path: Path) -> None:
    root, proc = cgroup_v1(tmp_path, "/", {"/": (-1, 100000)})
    cores = usable_cores(root, proc, affinity=4, host=4)
    assert cores == Cores(usable=4, host=4, source="host", quota=None)


def test_quota_above_affinity_keeps_affinity(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, "/pod", {"/pod": "800000 100000"})
    cores = usable_cores(root, proc, affinity=2, host=16)
    assert (cores.usable, cores.source, cores.quota) == (2, "affinity", 8.0)


def test_tiny_quota_still_one_core(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, "/pod", {"/pod": "1000 100000"})
    assert usable_cores(root, proc, affinity=4, host=4).usable == 1


def test_garbage_and_missing_files_are_ignored(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, "/a/b", {"/a": "nonsense", "/a/b": ""})
    assert usable_cores(root, proc, affinity=3, host=4).usable == 3
    nowhere = tmp_path / "missing"
    cores = usable_cores(nowhere, nowhere / "cgroup", affinity=4, host=4)
    assert cores == Cores(usable=4, host=4, source="host")


def test_this_process_never_gets_zero_cores() -> None:
    cores = usable_cores()
    assert 1 <= cores.usable <= cores.host


# -- the budget ---------------------------------------------------------------------------
def test_budget_from_the_server() -> None:
    b = budget.budget(Settings.from_env({}), 100, 3)
    assert b.total == 100 - 3 - 5
    assert "max_connections 100" in b.source and "TIERLINE_DB_RESERVED_CONNECTIONS 5" in b.source


def test_budget_counts_pg16_reserved_connections() -> None:
    b = budget.budget(Settings.from_env({"TIERLINE_DB_RESERVED_CONNECTIONS": "2"}), 40, 3, 4)
    assert b.total == 40 - 3 - 4 - 2
    assert "reserved_connections 4" in b.source


def test_explicit_budget_wins_and_tiny_servers_clamp_to_zero() -> None:
    s = Settings.from_env({"TIERLINE_DB_MAX_CONNECTIONS": "25"})
    assert budget.budget(s, 1000, 3) == budget.Budget(25, "TIERLINE_DB_MAX_CONNECTIONS")
    assert budget.budget(Settings.from_env({}), 6, 3).total == 0


# -- the CPU cap --------------------------------------------------------------------------
def cores(n: int, source: str = "host") -> Cores:
    return Cores(usable=n, host=n, source=source)


def test_pool_of_500_on_two_cores_is_capped_at_eight() -> None:
    s = Settings.from_env({"TIERLINE_WEB_DB_POOL_MAX": "500"})
    plan = budget.cpu_capped_pool(s, "web", cores(2))
    assert (plan.max_size, plan.min_size, plan.claimed) == (8, 1, 9)
    [cap] = plan.caps
    assert (cap.variable, cap.requested, cap.applied) == ("TIERLINE_WEB_DB_POOL_MAX", 500, 8)
    assert cap.reason == "2 usable cores (host) x TIERLINE_DB_POOL_CPU_FACTOR 4"


def test_cpu_factor_and_quota_source_show_in_the_reason() -> None:
    s = Settings.from_env(
        {"TIERLINE_WORKER_DB_POOL_MAX": "10", "TIERLINE_DB_POOL_CPU_FACTOR": "2.5"}
    )
    plan = budget.cpu_capped_pool(s, "worker", cores(1, "cgroup v1 cfs quota"))
    assert plan.max_size == 2
    assert plan.caps[0].reason == (
        "1 usable core (cgroup v1 cfs quota) x TIERLINE_DB_POOL_CPU_FACTOR 2.5"
    )


def test_pool_within_the_cpu_cap_is_untouched() -> None:
    s = Settings.from_env({"TIERLINE_WEB_DB_POOL_MIN": "2", "TIERLINE_WEB_DB_POOL_MAX": "6"})
    plan = budget.cpu_capped_pool(s, "web", cores(2))
    assert (plan.min_size, plan.max_size, plan.caps) == (2, 6, [])


def test_minimum_above_the_capped_maximum_is_capped_too() -> None:
    s = Settings.from_env({"TIERLINE_WEB_DB_POOL_MIN": "20", "TIERLINE_WEB_DB_POOL_MAX": "30"})
    plan = budget.cpu_capped_pool(s, "web", cores(1))
    assert (plan.min_size, plan.max_size) == (4, 4)
    assert [c.variable for c in plan.caps] == [
        "TIERLINE_WEB_DB_POOL_MAX",
        "TIERLINE_WEB_DB_POOL_MIN",
    ]
    assert plan.caps[1] == Cap(
        "TIERLINE_WEB_DB_POOL_MIN", 20, 4, "the pool's effective maximum is lower"
    )


# -- fitting into the budget ---------------------------------------------------------------
def web_plan(lo: int = 1, hi: int = 4) -> PoolPlan:
    return PoolPlan("web", lo, hi, lo, hi)


def test_fits_whole_when_there_is_room() -> None:
    plan = web_plan()
    assert budget.fit_to_budget(plan, free=5, budget_total=32) is plan


def test_shrinks_to_the_room_left_after_listen() -> None:
    got = budget.fit_to_budget(web_plan(), free=3, budget_total=32)
    assert got is not None and (got.max_size, got.claimed) == (2, 3)
    assert got.caps == [
        Cap(
            "TIERLINE_WEB_DB_POOL_MAX",
            4,
            2,
            "connection budget: 3 of 32 connections left (1 for LISTEN)",
        )
    ]


@pytest.mark.parametrize(("tier", "free"), [("web", 1), ("worker", 2), ("web", 0), ("web", -3)])
def test_below_the_smallest_usable_pool_waits(tier: str, free: int) -> None:
    plan = PoolPlan(tier, 1, 4, 1, 4)  # type: ignore[arg-type]
    assert budget.fit_to_budget(plan, free=free, budget_total=32) is None


def test_smallest_usable_pools() -> None:
    web = budget.fit_to_budget(web_plan(), free=2, budget_total=32)
    worker = budget.fit_to_budget(PoolPlan("worker", 1, 4, 1, 4), free=3, budget_total=32)
    assert web is not None and web.max_size == 1
    assert worker is not None and worker.max_size == 2


def test_minimum_cap_follows_the_budget_not_the_cpu() -> None:
    s = Settings.from_env({"TIERLINE_WEB_DB_POOL_MIN": "6", "TIERLINE_WEB_DB_POOL_MAX": "50"})
    plan = budget.cpu_capped_pool(s, "web", cores(1))  # max 4, min capped to 4
    got = budget.fit_to_budget(plan, free=3, budget_total=10)
    assert got is not None and (got.min_size, got.max_size) == (2, 2)
    mins = [c for c in got.caps if c.variable == "TIERLINE_WEB_DB_POOL_MIN"]
    assert [(c.requested, c.applied) for c in mins] == [(6, 2)]


def test_worker_pool_need() -> None:
    assert budget.worker_pool_need(10, handlers_use_db=False) == 2
    assert budget.worker_pool_need(10, handlers_use_db=True) == 12


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(0, 200),
    replicas=st.lists(
        st.tuples(st.sampled_from(["web", "worker"]), st.integers(1, 40)), max_size=60
    ),
)
def test_sequential_claims_never_exceed_the_budget(
    total: int, replicas: list[tuple[str, int]]
) -> None:
    """Replicas claiming one after another (as under the budget lock) stay within it."""
    claimed = 0
    for tier, size in replicas:
        plan = PoolPlan(tier, 1, size, 1, size)  # type: ignore[arg-type]
        got = budget.fit_to_budget(plan, total - claimed, total)
        if got is None:
            assert total - claimed < budget.MIN_USABLE_POOL[tier] + 1
            continue
        assert budget.MIN_USABLE_POOL[tier] <= got.max_size or got.max_size == size
        assert got.max_size <= size and got.min_size <= got.max_size
        claimed += got.claimed
        assert claimed <= total


# -- tierline plan --------------------------------------------------------------------------
def make_plan(web: int, workers: int, budget_total: int, **env: str) -> planning.Plan:
    s = Settings.from_env({"TIERLINE_DB_MAX_CONNECTIONS": str(budget_total), **env})
    return planning.plan(s, web=web, workers=workers, cores=1)


def test_plan_that_fits() -> None:
    p = make_plan(2, 3, 25)
    assert p.fits and p.total == 25 and p.shortfall == 0 and not p.problems
    text = planning.render(p)
    assert "planned: 25 of 25 -> fits (0 spare)" in text
    assert "does not fit" not in text


def test_plan_names_the_tier_and_the_shortfall() -> None:
    p = make_plan(1, 10, 20)
    assert not p.fits and p.shortfall == 35
    text = planning.render(p)
    assert "DOES NOT FIT (short by 35)" in text
    assert "does not fit, short by 35 connections:" in text
    assert (
        "worker tier: 10 x 5 = 50 connections; beside 1 web replica as planned, "
        "at most 3 worker replicas fit" in text
    )
    # The web tier is not the problem: no "at most 0 web replicas fit".
    assert "at most 0" not in text
    assert "fewer web replicas cannot make it fit" in text


def test_plan_suggests_a_pool_that_fits() -> None:
    p = make_plan(10, 2, 40)  # web 10 x 5 + worker 2 x 5 = 60
    [web_line] = [line for line in p.problems if line.startswith("web tier")]
    assert "at most 6 web replicas fit" in web_line
    assert "keep 10 with TIERLINE_WEB_DB_POOL_MAX=2 (3 per replica)" in web_line
    assert any("raise the budget by 20 to 60" in line for line in p.problems)


def test_plan_reports_cpu_caps_and_small_worker_pools() -> None:
    p = make_plan(1, 1, 100, TIERLINE_WEB_DB_POOL_MAX="500", TIERLINE_WORKER_DB_POOL_MAX="1")
    assert p.tiers[0].pool.max_size == 4
    text = planning.render(p)
    assert "TIERLINE_WEB_DB_POOL_MAX: requested 500, capped to 4 (1 usable core" in text
    assert "worker pool 1 is below the 2 connections a worker needs" in text


def run_plan(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("plan", *args, **extra)


def run_cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in tierline_env("", **extra).items() if "DATABASE" not in k}
    return subprocess.run(
        [sys.executable, "-m", "tierline", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_plan_exit_codes() -> None:
    ok = run_plan("--web", "2", "--workers", "3", "--db-max-connections", "25", "--cores", "1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "-> fits" in ok.stdout
    bad = run_plan("--web", "1", "--workers", "10", "--db-max-connections", "20")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "worker tier: 10 x 5 = 50 connections" in bad.stdout
    assert "short by 35" in bad.stdout


def test_cli_config_shows_the_cpu_cap_of_this_machine() -> None:
    out = run_cli("config", "--tier", "web", TIERLINE_WEB_DB_POOL_MAX="500")
    assert out.returncode == 0, out.stderr
    cores = usable_cores()
    applied = cores.usable * 4
    assert f"pool max on this machine: web {applied} ({cores.usable} usable core" in out.stdout
    assert f"TIERLINE_WEB_DB_POOL_MAX: requested 500, runs as {applied}" in out.stdout
    assert "worker" not in out.stdout.split("pool max on this machine")[1]
