"""Build, archive, serve and load each configuration; collect everything into one results dict."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ClassifierOptions, ModelConfig
from ..extras import require
from ..tslogs import tail_lines
from . import corpus, report, stock
from .configs import CONFIGS
from .corpus import BenchImage
from .gpu import GpuSampler
from .images import synthetic_jpeg
from .loadgen import run_load
from .packaging import package, prepare_artifacts
from .plan import Artifacts, Plan, Point, machine_meta
from .procs import busy_seconds, group_cpu_seconds, worker_env_threads, worker_processes
from .pyspy import Profiler
from .serving import Serving, Terminated, start_litserve, start_torchserve, stopping

Log = Callable[[str], None]


def measure(plan: Plan, serving: Serving, workers: int, log: Log, label: str = "") -> list[dict]:
    """Warm the server up, then one measured window per concurrency level."""
    target = serving.target
    run_load(
        target, max(plan.concurrency), duration=max(1.0, plan.warmup), warmup=0.0, processes=plan.loadgen_procs
    )  # untimed: first batches, JIT profiling, allocator growth
    pgid, roles = serving.pgid, serving.roles
    worker_pids = [p.pid for p in worker_processes(pgid, roles)]
    points = []
    probes = {
        "server": lambda: group_cpu_seconds(pgid),
        "frontend": lambda: group_cpu_seconds(pgid, "frontend", roles),
        "workers": lambda: group_cpu_seconds(pgid, "workers", roles),
        "machine": busy_seconds,
    }
    for conc in plan.concurrency:
        if stopping():  # its server is gone (SIGTERM): no further window
            raise Terminated()
        loadavg = os.getloadavg()[0]
        spy = Profiler(plan.out / "profiles", log) if plan.py_spy and conc == max(plan.concurrency) else None
        if spy:
            spy.start(worker_pids, plan.warmup + plan.duration, f"{label}-c{conc}")
        with GpuSampler() as gpu:
            load = run_load(target, conc, plan.duration, plan.warmup, plan.loadgen_procs, probes)
        table = spy.finish() if spy else None
        server_cores = load.probes.get("server", 0.0)
        point = report.point_summary(
            load,
            server_cpu_cores=round(server_cores, 2),
            **report.cpu_split(load.rps, server_cores, load.probes.get("frontend"), load.probes.get("workers")),
            machine_busy_cores=round(load.probes.get("machine", 0.0), 2),
            loadavg_1m=round(loadavg, 2),
            gpu=gpu.summary(worker_pids, workers),
        )
        lat = point["latency_ms"]
        log(
            f"    c={conc:4d}: {point['rps']:8.1f} req/s  p50 {lat['p50']} ms  p99 {lat['p99']} ms  "
            f"errors {point['errors']}  loadgen {point['loadgen_cpu_cores']:.2f} cores  "
            f"server {server_cores:.2f} cores "
            f"(frontend {point['frontend_ms_per_request']} ms/req, workers {point['workers_ms_per_request']} ms/req)"
        )
        if table:
            log(f"      py-spy, one worker at c={conc}:\n{table}")
        if load.error_samples:
            log(f"      errors: {load.error_samples[:2]}")
        if load.loadgen_cores > 0.8 * load.processes:
            log("      the load generator was nearly saturated: raise --loadgen-procs")
        points.append(point)
    return points


@dataclass(frozen=True)
class Session:
    """What every run of one bench invocation shares."""

    plan: Plan
    art: Artifacts
    images: Sequence[BenchImage]  # the request bodies
    workdir: Path
    default_threads: int  # stock's torch threads per worker


def start(session: Session, config: str, point: Point, run: dict) -> Serving:
    """Package and start one configuration's server; what it ran with goes into ``run``."""
    plan, images = session.plan, session.images
    slug = run["label"].replace(" ", "-")
    run_dir = session.workdir / "runs" / slug
    packed = package(plan, session.art, config, point, session.workdir, slug, session.default_threads)
    run.update(packed.facts, threads_per_worker=packed.threads)
    if packed.mar is None:
        assert packed.artifact is not None
        api_servers = plan.litserve_api_servers or point.total_workers
        run["api_servers"] = api_servers
        return start_litserve(
            plan, packed.artifact, packed.model_config, point, api_servers, run_dir, images, packed.topk
        )
    serving = start_torchserve(plan, packed.mar, point, packed.env, run_dir, images, packed.topk)
    run["worker_omp_num_threads"] = worker_env_threads(serving.pgid)
    return serving


def run_one(session: Session, config: str, point: Point, log: Log) -> dict[str, Any]:
    """Archive, serve, load and stop one configuration at one point; failures are recorded, not raised."""
    plan = session.plan
    label = point.label(config)
    run: dict[str, Any] = {
        "config": config,
        "label": label,
        "workers": point.workers,
        "batch": point.batch,
        "delay_ms": point.delay,
        "gpus": point.gpus if plan.device == "cuda" else 0,
    }
    logs = session.workdir / "runs" / label.replace(" ", "-") / "logs"
    try:
        log(f"  {label}: starting {CONFIGS[config].server}")
        t0 = time.monotonic()
        serving = start(session, config, point, run)
    except Exception as exc:  # keep going: one configuration failing must not lose the others
        run["error"] = f"{type(exc).__name__}: {exc}"
        log(f"    failed to start: {run['error']}\n{server_log_tail(logs)}")
        return run
    try:
        run["startup_s"] = round(time.monotonic() - t0, 1)
        log(f"    ready in {run['startup_s']} s; {run['threads_per_worker']} thread(s)/worker")
        run["workers_on_gpu"] = serving.workers_on_gpu
        if plan.device == "cuda" and not serving.workers_on_gpu:
            raise RuntimeError("no worker is on a GPU: the server found none (is nvidia-smi on PATH?)")
        run["points"] = measure(plan, serving, point.total_workers, log, label.replace(" ", "-"))
        used = [p["gpu"]["gpus_used"] for p in run["points"] if (p.get("gpu") or {}).get("gpus_used") is not None]
        run["gpus_used"] = max(used) if used else None
    except Exception as exc:
        run["error"] = f"{type(exc).__name__}: {exc}"
        log(f"    failed: {run['error']}\n{server_log_tail(logs)}")
    finally:
        serving.stop()
    return run


def server_log_tail(logs: Path) -> str:
    """The end of whichever server's console log the run left."""
    for name in ("torchserve.out", "peer.out"):
        if (logs / name).is_file():
            return tail_lines(logs / name)
    return ""


def schedule(plan: Plan, default_threads: int) -> list[tuple[str, Point, str | None]]:
    """(config, point, same_as) in run order: point by point so slow drift hits every configuration alike.

    A tuned stock run whose thread count equals the stock default is the untuned run again: it is not rerun.
    """
    order = []
    points = list(dict.fromkeys([*plan.points, *plan.stock_points]))
    for point in points:
        for config in plan.configs:
            if (point in plan.points) if CONFIGS[config].our_points else (point in plan.stock_points):
                same = None
                if (
                    CONFIGS[config].tuned_threads
                    and "stock" in plan.configs
                    and point.tuned_threads() == default_threads
                ):
                    same = point.label("stock")
                order.append((config, point, same))
    return order


def run_micro(plan: Plan, art: Artifacts, body: bytes, log: Log) -> dict[str, list]:
    """Model-only ceiling and decode-only rates, with no server running."""
    import torch

    from .micro import CPU_VARIANTS, GPU_VARIANTS, decode_rates, model_ceiling

    device = torch.device("cuda" if plan.device == "cuda" else "cpu")
    opts = ModelConfig.from_dict(art.base_config).options(ClassifierOptions)
    if device.type == "cpu":
        # One thread by default: a per-core rate that other load on the machine disturbs least.
        torch.set_num_threads(plan.ceiling_threads)
    variants = GPU_VARIANTS if device.type == "cuda" else CPU_VARIANTS
    log("model-only ceiling:")
    ceiling = model_ceiling(
        art.traced,
        art.plain_frozen,
        device,
        opts,
        plan.ceiling_batches,
        variants,
        plan.micro_seconds,
        log,
        alternates=art.alternates,
    )
    log("decode-only:")
    decode = decode_rates(body, opts, device, plan.decode_batches, plan.micro_seconds, log)
    return {"ceiling": ceiling, "decode": decode}


def choose_levers(plan: Plan, ceiling: Sequence[dict], cpu_bf16: bool) -> dict[str, Any]:
    """Resolve ``amp``/``freeze`` set to "auto": the fastest model-only variant at the largest batch wins.

    Only variants with the served memory layout compete. Without a ceiling, bf16 is chosen where the
    CPU has native bf16 instructions (AVX512-BF16 or AMX) and the artifact is not frozen.
    """
    layout = plan.channels_last_weights
    batch = max(plan.ceiling_batches) if plan.ceiling_batches else None
    rows = [
        r
        for r in ceiling
        if r.get("images_per_s")
        and r["batch"] == batch
        and r["channels_last"] == layout
        and not r.get("int8")
        and not r.get("pt2")
        and (plan.amp == "auto" or r["amp"] == (plan.amp not in (None, "off")))
        and (plan.freeze == "auto" or r["frozen"] == bool(plan.freeze))
    ]
    if rows:
        best = max(rows, key=lambda r: r["images_per_s"])
        amp = "bf16" if best["amp"] else "off"
        frozen = best["frozen"]
        why = (
            f"fastest model-only variant at batch {batch}: {best['variant']} ({best['images_per_s']} images/s) of "
            + ", ".join(f"{r['variant']} {r['images_per_s']}" for r in rows)
        )
    else:
        amp, frozen = ("bf16" if cpu_bf16 else "off"), False
        why = "no model-only measurement: bf16 where the CPU has AVX512-BF16/AMX, not frozen"
    return {
        "amp": amp if plan.amp == "auto" else plan.amp,
        "freeze": frozen if plan.freeze == "auto" else bool(plan.freeze),
        "why": why,
    }


def resolve_levers(plan: Plan, results: dict[str, Any], log: Log) -> None:
    """Fix ``plan.amp``/``plan.freeze`` before any server starts, and record why."""
    if plan.amp != "auto" and plan.freeze != "auto":
        if plan.amp is not None:
            plan.handler_overrides["amp"] = plan.amp
        return
    flags = results["meta"].get("cpu_flags", [])
    choice = choose_levers(
        plan, results.get("ceiling", []), cpu_bf16=any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    )
    log(f"our handler: amp {choice['amp'] or 'from model-config'}, frozen {choice['freeze']} ({choice['why']})")
    results["meta"]["choices"] = choice
    plan.amp, plan.freeze = choice["amp"], choice["freeze"]
    if plan.amp is not None:
        plan.handler_overrides["amp"] = plan.amp


def execute(plan: Plan, log: Log = print) -> dict[str, Any]:
    """Run the whole plan and write results.json, bench.png and report.md into ``plan.out``."""
    plan.out.mkdir(parents=True, exist_ok=True)
    runs_stock = any(CONFIGS[c].stock_handler for c in plan.configs)
    if runs_stock:
        stock.check_stock_available()
    for c in plan.configs:
        extra = CONFIGS[c].extra
        if extra:
            require(CONFIGS[c].server, extra, f"the {c} configuration")
    results: dict[str, Any] = {"meta": machine_meta(plan), "plan": _plan_dict(plan), "runs": []}
    with tempfile.TemporaryDirectory(prefix="servekit-bench-") as tmp:
        workdir = Path(tmp)
        log(f"building {plan.model}")
        art = prepare_artifacts(plan, workdir, log)
        results["meta"]["artifact"] = {
            "export": "TorchScript trace",
            "weights": plan.weights or "seeded random initialisation",
            "channels_last_weights": plan.channels_last_weights,
            "size_mb": round(art.served.stat().st_size / 1e6, 1),
        }
        images = corpus.load(plan.images, plan.image_bytes)
        results["meta"]["images"] = corpus.describe(images, corpus.source_name(plan.images))
        log(f"request bodies: {corpus.summary_line(results['meta']['images'])}")
        if plan.micro:  # decode-only rates: always the synthetic JPEG, comparable from run to run
            results.update(run_micro(plan, art, synthetic_jpeg(target_bytes=plan.image_bytes), log))
        resolve_levers(plan, results, log)
        results["meta"]["artifact"]["ours_frozen"] = plan.freeze
        defaults = stock.default_threads() if runs_stock else os.cpu_count() or 1
        results["meta"]["stock_default_threads"] = defaults
        order = schedule(plan, defaults)
        session = Session(plan, art, images, workdir, defaults)
        log(f"{len(order)} configuration(s) x {len(plan.concurrency)} concurrency level(s)")
        done: dict[str, dict] = {}
        for config, point, same_as in order:
            if same_as and same_as in done:
                run = {
                    **copy.deepcopy(done[same_as]),
                    "config": config,
                    "same_as": same_as,
                    "label": point.label(config),
                }
                log(f"  {run['label']}: same settings as {same_as}; not rerun")
            else:
                run = run_one(session, config, point, log)
            done[run["label"]] = run
            results["runs"].append(run)
            report.write_json(results, plan.out / "results.json")  # partial results survive a crash
        if plan.keep:
            shutil.copytree(
                workdir / "runs",
                plan.out / "server-runs",
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns(".ts.sock*"),
            )
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["comparison"] = report.comparison_rows(results["runs"])
    write_outputs(results, plan.out)
    return results


def write_outputs(results: dict[str, Any], out: Path) -> str:
    """results.json, report.md and bench.png; returns the Markdown report."""
    text = report.full_report(results)
    report.write_json(results, out / "results.json")
    (out / "report.md").write_text(text)
    meta = results.get("meta")
    title = ""
    if isinstance(meta, dict):
        title = f"{meta.get('model')} on {meta.get('device')}: {', '.join(meta.get('gpus') or []) or meta.get('cpu')}"
    report.plot(results.get("runs", []), out / "bench.png", title)
    return text


def _plan_dict(plan: Plan) -> dict[str, Any]:
    d = {k: v for k, v in vars(plan).items() if k not in ("out",)}
    d["points"] = [vars(p) for p in plan.points]
    d["stock_points"] = [vars(p) for p in plan.stock_points]
    d["out"] = str(plan.out)
    return d
