"""Tierline as a fraction of the physical limit: the cheapest SQL for the same work
(``bench/limit_sql.py``) on the same server, in the same run, alternating.

Workloads: drain of no-op jobs (the limit: a bare claim + finish loop on one
connection, 1,000 at a time; Tierline: one ``tierline worker`` with 1,000 slots,
database-confirmed), enqueue one at a time (the limit: a single-row ``INSERT`` per
commit) and in batches of 1,000 (one ``INSERT ... SELECT FROM unnest``). Beside each
figure: WAL bytes, transactions and statements per job (``bench/dbmeter.py``). Run it
with ``--private-server`` for WAL figures nobody else's writes inflate, and statement counts
(``pg_stat_statements``).
"""

from __future__ import annotations

from typing import Any

from bench import command, compare, output, percentiles

NAME = "limit"
SYSTEMS = ["tierline", "limit"]
METRIC = {"drain": "db_rate", "enqueue_single": "rate", "enqueue_batch": "rate"}
LABELS = {
    "drain": "drain {drain_jobs:,} no-op jobs (database-confirmed jobs/s)",
    "enqueue_single": "enqueue one at a time, each committed (jobs/s)",
    "enqueue_batch": "enqueue in batches of {batch:,} (jobs/s)",
}


def summarize(args: Any, runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key in args.workloads:
        per: dict[str, Any] = {}
        for system in SYSTEMS:
            mine = [r for r in runs if r["key"] == key and r["system"] == system and "cost" in r]
            rates = [float(r[METRIC[key]]) for r in mine if r.get(METRIC[key])]
            cost: dict[str, float | None] = {}
            for c in ("wal_bytes_per_job", "xacts_per_job", "statements_per_job"):
                vals = [r["cost"][c] for r in mine if r["cost"][c] is not None]
                cost[c] = percentiles.median(vals) if vals else None
            per[system] = {"rate": percentiles.median(rates) if rates else None, **cost}
        tl, lim = per["tierline"]["rate"], per["limit"]["rate"]
        fraction = tl / lim if tl and lim else None
        # Per round, so that drift of the shared machine hits both sides of a ratio alike.
        by_round = []
        for rnd in sorted({r["round"] for r in runs}):
            pair: dict[str, float] = {
                r["system"]: float(r[METRIC[key]])
                for r in runs
                if r["key"] == key and r["round"] == rnd and r.get(METRIC[key])
            }
            if "tierline" in pair and "limit" in pair:
                by_round.append(round(pair["tierline"] / pair["limit"], 3))
        summary[key] = {
            "label": LABELS[key].format(**vars(args)),
            "systems": per,
            "tierline_fraction_of_limit": fraction,
            "fraction_by_round": by_round,
        }
    return summary


def _n(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(args: Any, summary: dict[str, Any], meta: dict[str, Any]) -> str:
    rows = []
    for s in summary.values():
        t, lim = s["systems"]["tierline"], s["systems"]["limit"]
        rows.append(
            [
                s["label"],
                _n(lim["rate"], ",.0f"),
                _n(t["rate"], ",.0f"),
                _n(s["tierline_fraction_of_limit"], ".2f")
                + f" ({', '.join(f'{x:.2f}' for x in s['fraction_by_round'])})",
                f"{_n(lim['wal_bytes_per_job'], ',.0f')} / {_n(t['wal_bytes_per_job'], ',.0f')}",
                f"{_n(lim['statements_per_job'], '.3f')} / {_n(t['statements_per_job'], '.3f')}",
                f"{_n(lim['xacts_per_job'], '.3f')} / {_n(t['xacts_per_job'], '.3f')}",
            ]
        )
    where = "a private PostgreSQL 15" if args.private_server else "the machine's PostgreSQL"
    return "\n".join(
        [
            f"`{meta['command']}`: {meta['rounds']} round(s), Tierline and the limit "
            f"alternating, medians, on {where} ({meta['server']['synchronous_commit']} "
            f"synchronous_commit); load average {meta['machine']['load_average_at_start']} "
            f"at the start, {output.load_average()} at the end; {meta['started_at']} to "
            f"{meta['ended_at']} UTC.",
            "",
            output.table(
                [
                    "workload",
                    "limit",
                    "Tierline",
                    "Tierline / limit (per round)",
                    "WAL bytes/job: limit / Tierline",
                    "statements/job: limit / Tierline",
                    "transactions/job: limit / Tierline",
                ],
                rows,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = command.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    p.set_defaults(out=command.RESULTS / NAME)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workloads", default="drain,enqueue_single,enqueue_batch")
    p.add_argument("--drain-jobs", type=int, default=20_000)
    p.add_argument("--single-jobs", type=int, default=2_000)
    p.add_argument("--batch-jobs", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--private-server", action="store_true", help="As in bench/compare.")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.drain_jobs, args.single_jobs, args.batch_jobs = 1, 200, 30, 300
        args.batch = 100
    args.workloads = [w for w in args.workloads.split(",") if w]
    # compare.workload_points reads these; the limit has no I/O or pickup workload.
    args.io_procs, args.io_window, args.io_warmup = [], 0.0, 0.0
    args.pickup_jobs, args.pickup_rate = 0, 0.0
    meta = compare.run_started(NAME, args.rounds)
    runs: list[dict[str, Any]] = []
    with compare.server(args) as admin:
        meta["server"] = output.server_info(admin)
        for rnd in range(args.rounds):
            for i, (key, workload, extra) in enumerate(compare.workload_points(args)):
                order = SYSTEMS if (rnd + i) % 2 == 0 else SYSTEMS[::-1]
                for system in order:
                    r = compare.run_one(args, admin, system, workload, extra, None)
                    runs.append({**r, "key": key, "round": rnd + 1})
                    command.say(f"round {rnd + 1} {key} {system}: {compare.brief(r)}")
    compare.run_ended(meta)
    summary = summarize(args, runs)
    data = {**meta, "private_server": args.private_server, "summary": summary, "runs": runs}
    md = markdown(args, summary, meta)
    output.write_results(NAME, args, data, md)
    print(md)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
