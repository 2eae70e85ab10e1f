"""The results file of `vlab migrate` (source side, or both sides on loopback).

A `vlab.run/1` document like any other: `host` is this host's record (the source's), rows of
experiment `migrate` carry the migration's figures (total_ms, downtime_ms, rounds, bytes_sent,
verified; the metric names of `migration.live`), and `destination_host` holds the destination's
record when the destination sent it (after authentication, vlab.migration.auth), so a
cross-host migration's results carry both hosts. A migration that failed is one error row with
its reason; nothing is written when no migration was attempted (bad usage, no connection).
"""
from __future__ import annotations

import datetime as dt
import sys
from typing import Any

EXPERIMENT = "migrate"
METRICS = {"total_ms": "ms", "downtime_ms": "ms", "rounds": "rounds", "bytes_sent": "bytes",
           "verified": "bool"}


def params_of(cfg, peer: str) -> dict[str, Any]:
    """The case's parameters: the guest, the migration options, and where it went."""
    s, o = cfg.spec, cfg.opts
    return {"workload": s.workload, "mem": s.mem, "rate": s.rate, "strategy": o.strategy,
            "mode": o.mode, "policy": o.policy,
            "link_mbit": o.bandwidth * 8 / 1e6 if o.bandwidth else None,
            "max_downtime_ms": o.max_downtime_ms, "max_rounds": o.max_rounds,
            "auto_converge": o.auto_converge, "peer": peer}


def rows_of(res: dict[str, Any], params: dict[str, Any]) -> list[dict[str, Any]]:
    from vlab import results

    outcome = res.get("outcome")
    extra = {"outcome": outcome, "pages_per_round": res.get("pages_per_round"),
             "auth": res.get("auth"), "guest_problems": res.get("guest_problems"),
             "switchover_detail_ms": res.get("switchover_detail_ms")}
    if outcome in (None, "failed", "failed_after_commit") or res.get("error"):
        return [results.error_row(EXPERIMENT, params, "verified", "bool",
                                  f"migration {outcome}: {res.get('error') or 'no result'}",
                                  extra=extra)]
    rows = []
    for metric, unit in METRICS.items():
        v = res.get(metric)
        if metric == "verified":
            if outcome == "aborted":
                continue
            v = 1.0 if res.get("verified") else 0.0
        if v is None:
            continue
        rows.append(results.make_row(EXPERIMENT, params, metric, unit, [float(v)], extra=extra))
    return rows


def migrate_doc(res: dict[str, Any], cfg, *, peer: str, started: dt.datetime,
                argv: list[str], host: dict[str, Any]) -> dict[str, Any]:
    """The results document of one migration."""
    from vlab import results

    doc = results.new_document(host, rows_of(res, params_of(cfg, peer)), argv=argv, suite=None,
                               started=started)
    dest = res.get("destination") if isinstance(res.get("destination"), dict) else {}
    doc["destination_host"] = res.get("destination_host") or dest.get("host") or \
        (host if peer == "loopback" else None)
    doc["migration"] = {"outcome": res.get("outcome"), "error": res.get("error"),
                        "auth": res.get("auth"), "to": peer}
    return doc


def write_results(args, res: dict[str, Any], cfg) -> str | None:
    """Write `vlab migrate`'s results file (unless --no-results); its path, said on stderr."""
    import os

    from vlab import results
    from vlab.host.calibrate import collect_host
    from vlab.run.runner import default_output

    if getattr(args, "no_results", False):
        return None
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(
        milliseconds=float(res.get("total_ms") or 0))
    peer = args.to or "loopback"
    doc = migrate_doc(res, cfg, peer=peer, started=started, argv=sys.argv[1:],
                      host=collect_host())
    path = args.output or default_output(doc).replace(
        os.sep + doc["started_at"][:4], os.sep + "migrate-" + doc["started_at"][:4])
    results.write_atomic(doc, path)
    print(f"results: {path}", file=sys.stderr)
    return path
