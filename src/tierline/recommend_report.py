"""``tierline recommend``: the recommendation as a table, with its reasoning."""

from __future__ import annotations

from tierline.recommend import Recommendations
from tierline.settings import Settings


def render(rec: Recommendations, settings: Settings) -> str:
    """The CLI table with its reasoning: inputs, formula, result, binding limit."""
    i = rec.inputs
    rows = [("tier", "now", "recommended", "bound by", "formula")]
    for t in rec.tiers():
        rows.append((t.tier, str(t.current), str(t.recommended), t.bound, t.formula))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join([*(r[c].ljust(widths[c]) for c in range(4)), r[4]]).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 7)

    def fmt(x: float | None, unit: str, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}g} {unit}".strip()

    src = i.sources
    lines += [
        "",
        "inputs:",
        f"  arrival rate        {fmt(i.arrival_rate, 'jobs/s')}  ({src.get('arrival_rate', '')})",
        f"  service time        {fmt(i.service_time_s, 's')}  ({src.get('service_time_s', '')})",
        f"  backlog             {i.backlog} due jobs waiting, oldest {fmt(i.oldest_age_s, 's')}",
        f"  throughput          {fmt(i.throughput, 'jobs/s')} (finished, 5 min)",
        f"  worker slots        {i.worker_concurrency:g} per replica "
        f"({src.get('worker_concurrency', '')})",
        f"  web requests        {fmt(i.web_rps, 'req/s')}, worst p99 {fmt(i.web_p99_ms, 'ms')}",
        f"  connection budget   {i.budget_total} ({i.budget_source})",
        f"  claim per replica   web {i.web_claim}, worker {i.worker_claim} (pool max + 1 LISTEN)",
        "",
        "targets:",
        f"  utilisation         {settings.target_utilization:g} (TIERLINE_TARGET_UTILIZATION)",
        f"  backlog drained in  {settings.backlog_target_s:g} s (TIERLINE_BACKLOG_TARGET_S)",
        f"  web capacity        {settings.web_replica_capacity_rps:g} req/s per replica "
        "(TIERLINE_WEB_REPLICA_CAPACITY_RPS)",
    ]
    for t in rec.tiers():
        cap = "no budget cap" if t.budget_max is None else f"budget allows {t.budget_max}"
        lines.append(
            f"  {t.tier + ' replicas':<19} {t.minimum}..{t.maximum} "
            f"(TIERLINE_{t.tier.upper()}_REPLICAS_MIN/MAX); {cap}"
        )
    advice = []
    for t in rec.tiers():
        if t.change > 0:
            advice.append(f"add {t.change} {t.tier} replica(s) ({t.bound})")
        elif t.change < 0:
            advice.append(f"{t.tier} could lose {-t.change} replica(s) ({t.bound})")
    lines += ["", "advice: " + ("; ".join(advice) if advice else "no change")]
    return "\n".join(lines)
