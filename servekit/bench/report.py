"""Summaries of benchmark runs: percentiles, comparison tables (Markdown), JSON and a PNG plot."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..extras import require
from .configs import ALTERNATES, BASELINES, CONFIGS, OURS
from .corpus import summary_line

QUANTILES = (50, 90, 99)


def percentiles(values: Sequence[float], qs: Iterable[float] = QUANTILES) -> dict[str, float | None]:
    """``{"p50": ..., "p90": ..., "p99": ...}`` (linear interpolation); None for an empty sample."""
    qs = list(qs)
    if len(values) == 0:
        return {f"p{q:g}": None for q in qs}
    found = np.percentile(np.asarray(values, dtype=float), qs)
    return {f"p{q:g}": round(float(v), 2) for q, v in zip(qs, found)}


def point_summary(load: Any, **extra: Any) -> dict[str, Any]:
    """One concurrency level of one run, as stored in the JSON (``load`` is a LoadResult)."""
    lat = load.latencies_ms
    return {
        "concurrency": load.concurrency,
        "rps": round(load.rps, 2),
        "completed": load.completed,
        "duration_s": round(load.duration_s, 2),
        "latency_ms": {
            **percentiles(lat),
            "mean": round(float(np.mean(lat)), 2) if lat else None,
            "max": round(max(lat), 2) if lat else None,
        },
        "errors": load.errors,
        "error_samples": load.error_samples,
        "loadgen_processes": load.processes,
        "loadgen_cpu_cores": round(load.loadgen_cores, 3),
        **extra,
    }


def cpu_split(rps: float, server: float, frontend: float | None, workers: float | None) -> dict[str, Any]:
    """Server CPU per request, split between TorchServe's frontend and the Python workers."""

    def per_request_ms(cores: float | None) -> float | None:
        return round(1000.0 * cores / rps, 3) if cores is not None and rps > 0 else None

    return {
        "frontend_cpu_cores": None if frontend is None else round(frontend, 2),
        "workers_cpu_cores": None if workers is None else round(workers, 2),
        "server_ms_per_request": per_request_ms(server),
        "frontend_ms_per_request": per_request_ms(frontend),
        "workers_ms_per_request": per_request_ms(workers),
        "requests_per_server_cpu_s": round(rps / server, 1) if server > 0 else None,
    }


def best_by_config(runs: Sequence[dict]) -> dict[str, dict[int, tuple[float, str]]]:
    """For each configuration family, its best requests/s at each concurrency and the run that got it."""
    best: dict[str, dict[int, tuple[float, str]]] = {}
    for run in runs:
        for p in run.get("points", []):
            if p["errors"]:
                continue  # a run that drops requests does not count as a best
            cur = best.setdefault(run["config"], {}).get(p["concurrency"])
            if cur is None or p["rps"] > cur[0]:
                best[run["config"]][p["concurrency"]] = (p["rps"], run["label"])
    return best


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def comparison_rows(runs: Sequence[dict]) -> list[dict[str, Any]]:
    """Per concurrency (and peak): best req/s of each family and ours' speed-up over each stock family."""
    best = best_by_config(runs)
    levels = sorted({c for fam in best.values() for c in fam})
    rows = []
    for level in [*levels, "peak"]:
        row: dict[str, Any] = {"concurrency": level}
        for cfg in CONFIGS:
            fam = best.get(cfg, {})
            pick = max(fam.values(), default=None) if level == "peak" else fam.get(level)  # type: ignore[call-overload]
            row[cfg] = pick[0] if pick else None
            row[f"{cfg}_run"] = pick[1] if pick else None
        for ours in OURS:
            prefix = f"{ALTERNATES[ours]}_" if ours in ALTERNATES else ""
            for base in BASELINES:
                row[f"{prefix}speedup_vs_{base.replace('-', '_')}"] = (
                    row[ours] / row[base] if row[ours] and row[base] else None
                )
        rows.append(row)
    return rows


def _md(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(v: float | None, digits: int = 1) -> str | None:
    return None if v is None else f"{v:.{digits}f}"


def comparison_table(runs: Sequence[dict]) -> str:
    """Ours against stock (untuned and tuned) and any peer that ran: best requests/s per concurrency, speed-ups.

    Columns for an alternate artifact (int8, pt2) or a peer (LitServe) appear only when it ran.
    """
    ran = {r.get("config") for r in runs}
    extra = [c for c in ALTERNATES if c in ran]
    bases = [b for b in BASELINES if b in ("stock", "stock-tuned") or b in ran]
    rows = []
    for r in comparison_rows(runs):
        row = [r["concurrency"], _num(r["ours"]), *(_num(r[b]) for b in bases)]
        row += [_ratio(r["ours"], r[b]) for b in bases]
        for c in extra:
            row += [_num(r[c]), *(_ratio(r[c], r[b]) for b in bases)]
        rows.append(row + [r["ours_run"]] + [r[f"{b}_run"] for b in bases] + [r[f"{c}_run"] for c in extra])
    header = ["concurrency", "ours req/s", *(f"{BASELINES[b]} req/s" for b in bases)]
    header += [f"ours/{BASELINES[b]}" for b in bases]
    for c in extra:
        header += [f"ours {ALTERNATES[c]} req/s", *(f"{ALTERNATES[c]}/{BASELINES[b]}" for b in bases)]
    header += ["best ours run", *(f"best {BASELINES[b]} run" for b in bases)]
    header += [f"best {ALTERNATES[c]} run" for c in extra]
    return _md(header, rows)


RUNS_HEADER = [
    "run",
    "threads/worker",
    "concurrency",
    "req/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "errors",
    "loadgen cores",
    "server cores",
    "frontend CPU ms/req",
    "workers CPU ms/req",
    "req per server CPU-s",
    "other cores",
    "GPU util %",
    "GPU MiB/worker",
    "GPUs used",
]


def runs_table(runs: Sequence[dict]) -> str:
    """Every run and concurrency: throughput, latency percentiles, errors, CPU and GPU use."""
    rows = []
    for run in runs:
        if run.get("error"):
            failed = [run["label"], "-", "-", "-", "-", "-", "-", f"failed: {run['error'][:60]}"]
            rows.append(failed + ["-"] * (len(RUNS_HEADER) - len(failed)))
            continue
        for p in run["points"]:
            lat = p["latency_ms"]
            gpu = p.get("gpu") or {}
            other = None
            if p.get("machine_busy_cores") is not None and p.get("server_cpu_cores") is not None:
                other = max(0.0, p["machine_busy_cores"] - p["server_cpu_cores"] - p["loadgen_cpu_cores"])
            rows.append(
                [
                    run["label"] + (f" (= {run['same_as']})" if run.get("same_as") else ""),
                    run["threads_per_worker"],
                    p["concurrency"],
                    _num(p["rps"]),
                    _num(lat["p50"]),
                    _num(lat["p90"]),
                    _num(lat["p99"]),
                    p["errors"],
                    _num(p["loadgen_cpu_cores"], 2),
                    _num(p.get("server_cpu_cores"), 2),
                    _num(p.get("frontend_ms_per_request"), 3),
                    _num(p.get("workers_ms_per_request"), 3),
                    _num(p["rps"] / p["server_cpu_cores"] if p.get("server_cpu_cores") else None),
                    _num(other, 2),
                    _num(gpu.get("util_mean_pct")),
                    gpu.get("mem_per_worker_mib"),
                    gpu.get("gpus_used"),
                ]
            )
    return _md(RUNS_HEADER, rows)


def micro_tables(results: dict[str, Any]) -> str:
    """The model-only ceiling and the decode-only rates."""
    out = []
    if results.get("ceiling"):
        out.append("Model-only ceiling (preprocessed tensors already on the device):\n")
        out.append(
            _md(
                ["variant", "device", "threads", "batch", "images/s"],
                [
                    [
                        c["variant"],
                        c["device"],
                        c.get("threads"),
                        c.get("batch"),
                        _num(c.get("images_per_s")) or f"failed: {c.get('error', '')[:80]}",
                    ]
                    for c in results["ceiling"]
                ],
            )
        )
    if results.get("decode"):
        out.append("\nDecode-only (one thread; GPU rows: batched on the device):\n")
        out.append(
            _md(
                ["path", "device", "batch", "images/s"],
                [
                    [
                        d["path"],
                        d["device"],
                        d["batch"],
                        _num(d.get("images_per_s")) or f"failed: {d.get('error', '')[:80]}",
                    ]
                    for d in results["decode"]
                ],
            )
        )
    return "\n".join(out)


def full_report(results: dict[str, Any]) -> str:
    """Everything as Markdown: comparison, per-run table, micro-benchmarks."""
    runs = results.get("runs", [])
    parts = []
    metas = results.get("meta") or []
    # A merged report has one meta per file: each distinct set of request bodies is named once.
    lines = dict.fromkeys(
        summary_line(m["images"]) for m in (metas if isinstance(metas, list) else [metas]) if m.get("images")
    )
    parts += [f"Request bodies: {line}\n" for line in lines]
    if runs:
        parts += [
            "Comparison (best run of each configuration at each concurrency):\n",
            comparison_table(runs),
            "\nAll runs:\n",
            runs_table(runs),
        ]
    micro = micro_tables(results)
    if micro:
        parts += ["", micro]
    return "\n".join(parts) + "\n"


def write_json(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``results`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)
    return path


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several result files (e.g. one per GPU phase) as one: runs and micro rows concatenated."""
    merged: dict[str, Any] = {"meta": [r.get("meta", {}) for r in results], "runs": [], "ceiling": [], "decode": []}
    for r in results:
        for key in ("runs", "ceiling", "decode"):
            merged[key] += r.get(key, [])
    merged["comparison"] = comparison_rows(merged["runs"])
    return merged


COLORS = {name: c.color for name, c in CONFIGS.items()}


def plot(runs: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path | None:
    """Throughput vs concurrency per run, and p50/p99 latency vs concurrency; None when nothing ran."""
    runs = [r for r in runs if r.get("points") and not r.get("same_as")]  # a copy would hide under its twin
    if not runs:
        return None
    require("matplotlib", "bench", "the bench plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(13, 5))
    markers = "osD^v<>phX*"
    for i, run in enumerate(runs):
        pts = sorted(run["points"], key=lambda p: p["concurrency"])
        conc = [p["concurrency"] for p in pts]
        color, marker = COLORS.get(run["config"], "gray"), markers[i % len(markers)]
        ax_t.plot(conc, [p["rps"] for p in pts], marker=marker, color=color, label=run["label"])
        ax_l.plot(conc, [p["latency_ms"]["p50"] for p in pts], marker=marker, color=color, label=f"{run['label']} p50")
        ax_l.plot(
            conc,
            [p["latency_ms"]["p99"] for p in pts],
            marker=marker,
            color=color,
            linestyle="--",
            alpha=0.6,
            label=f"{run['label']} p99",
        )
    for ax in (ax_t, ax_l):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.grid(True, alpha=0.3)
    ax_t.set_ylabel("requests/s")
    ax_t.set_title("Throughput")
    ax_l.set_ylabel("latency (ms)")
    ax_l.set_yscale("log")
    ax_l.set_title("Latency p50 (solid) and p99 (dashed)")
    ax_t.legend(fontsize=7)
    ax_l.legend(fontsize=6, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
