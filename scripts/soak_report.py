"""The soak's verdict: its figures and checks, from what a run recorded (scripts/soak.py)."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from datetime import datetime
from typing import Any

from servekit.loadcheck import CheckedLoad


def report(soak: Any, ours: CheckedLoad, raw: CheckedLoad, refusals: int, metrics: dict[str, float]) -> dict:
    """The run's figures and its checks, from what ``soak`` (a ``soak.Soak`` after its run) recorded."""
    ev = soak.events
    window = (ev["kill"] - 0.5, ev["worker_ready"] + 1.0)

    def outside(items: list[tuple[float, float]]) -> int:
        return sum(1 for start, end in items if not (window[0] <= end and start <= window[1]))

    outcomes = {"servekit": ours.snapshot(), "raw": raw.snapshot()}
    failures = {k: [o for o in v if not o.ok] for k, v in outcomes.items()}
    latencies = sorted((o.end - o.start) * 1000 for v in outcomes.values() for o in v if o.ok)
    answered = {v for v, _ in soak.published} | {"1.0"}
    seen = {o.version for v in outcomes.values() for o in v if o.ok}
    health_bad = [(t, d) for t, ok, d in soak.health if not ok]
    renewals = sum(v for k, v in metrics.items() if "renewals_total" in k and 'result="success"' in k)
    gaps = [b - a for a, b in zip(_beats(soak.heartbeats), _beats(soak.heartbeats)[1:])]
    # Memory is compared where the server is in the same state: just before each publish
    # (one version serving, all events of the cycle over), and at the end.
    marks = [t for _, t in soak.published[1:]] + [soak.args.duration]
    points = [max((s for s in soak.rss if s.t < m), key=lambda s: s.t) for m in marks if soak.rss]
    points = [p for p in points if p.t > ev["recovered"] + 10] or points[-1:]

    def flat(key: str, slack: float, allowance: float) -> bool | None:
        values = [getattr(p, key) for p in points]
        return values[-1] <= values[0] * (1 + slack) + allowance if len(values) >= 2 else None

    checks = {
        "every_request_answered": all(o.status is not None for v in outcomes.values() for o in v),
        "failures_only_in_kill_window": all(outside([(o.start, o.end) for o in f]) == 0 for f in failures.values()),
        "raw_client_never_refused_twice": not any("InvalidKey" in o.error for o in failures["raw"]),
        "unhealthy_only_in_kill_window": all(window[0] - 10 <= t <= window[1] + 10 for t, _ in health_bad),
        "every_version_answered": answered <= seen,
        "keys_renewed": renewals >= 2 * max(1, int(soak.args.duration // (soak.args.key_minutes * 60)) - 1),
        "watcher_alive_at_end": soak.watcher_alive_at_end,
        "watcher_kept_polling": bool(gaps)
        and max(gaps) < 60
        and not metrics.get('servekit_watcher_polls_total{result="failure"}'),
        "logs_under_cap": max(s.logs_mb for s in soak.rss) <= soak.log_cap_mb(),
        # The JVM keeps sizing its heap (G1's adaptive young generation) and compiling code for its
        # first minutes: 20-50 MB of growth that then holds (docs/soak.md), not a leak.
        "frontend_rss_flat": flat("frontend_mb", 0.05, 50.0),
        "worker_rss_flat": flat("workers_mb", 0.05, 20.0),
        # The memory compared is the model workers' own: at least one was found at every point.
        "workers_measured": bool(points) and all(p.workers >= 1 for p in points),
        "preloader_rss_flat": flat("preloader_mb", 0.0, 10.0) if any(s.preloader_mb for s in soak.rss) else None,
        "watcher_rss_flat": flat("watcher_mb", 0.0, 10.0),
        "watcher_rss_under_150_mb": max(s.watcher_mb for s in soak.rss) <= 150,
    }
    return {
        "duration_s": soak.args.duration,
        "threads": soak.args.threads + 1,
        "key_minutes": soak.args.key_minutes,
        "publish_every_s": soak.args.publish_every,
        "requests": {k: len(v) for k, v in outcomes.items()},
        "failed": {k: len(v) for k, v in failures.items()},
        "raw_client_refusals": refusals,
        "throughput_rps": round(sum(len(v) for v in outcomes.values()) / soak.args.duration, 1),
        "latency_ms": {
            "p50": round(statistics.median(latencies), 1) if latencies else None,
            "p99": round(latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
            "max": round(latencies[-1], 1) if latencies else None,
        },
        "published": [
            {"version": v, "at_s": round(t, 1), "done_s": round(ev.get(f"v{v}_done", -1), 1)} for v, t in soak.published
        ],
        "events_s": {k: round(v, 2) for k, v in ev.items()},
        "kill_window_s": [round(window[0], 2), round(window[1], 2)],
        "recovery_s": round(ev["recovered"] - ev["kill"], 2),
        "key_renewals": renewals,
        "watcher_heartbeats": len(soak.heartbeats),
        "max_heartbeat_gap_s": round(max(gaps), 1) if gaps else None,
        "health_checks": len(soak.health),
        "unhealthy": health_bad,
        "logs_mb": {"max": max(s.logs_mb for s in soak.rss), "cap": round(soak.log_cap_mb(), 1)},
        "rss_mb": {
            key: {
                "max": max(getattr(s, key) for s in soak.rss),
                "compared": [[p.t, getattr(p, key)] for p in points],
            }
            for key in ("frontend_mb", "workers_mb", "watcher_mb", "preloader_mb")
        },
        "checks": checks,
        "passed": all(v is not False for v in checks.values()),
        "failures": {k: [asdict(o) for o in v[:50]] for k, v in failures.items()},
        "rss_samples": [asdict(s) for s in soak.rss],
    }


def _beats(heartbeats: list[str]) -> list[float]:
    return [datetime.fromisoformat(b).timestamp() for b in heartbeats]
