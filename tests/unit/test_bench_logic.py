"""The benchmark's pure logic: windows, percentiles, reports, plans and schedules (no server)."""

from __future__ import annotations

import io
import json
import threading

import pytest
from PIL import Image

from servekit.bench import PROFILES, build_parser, plan_from_args, serving
from servekit.bench.configs import CONFIGS
from servekit.bench.gpu import GpuSampler
from servekit.bench.images import synthetic_jpeg
from servekit.bench.loadgen import LoadResult, Target, split, summarize, valid_answer
from servekit.bench.packaging import ours_config
from servekit.bench.plan import Point
from servekit.bench.report import (
    comparison_rows,
    comparison_table,
    cpu_split,
    merge,
    percentiles,
    point_summary,
    runs_table,
)
from servekit.bench.runner import choose_levers, measure, schedule
from servekit.bench.stock import index_to_name
from servekit.errors import ConfigError


def test_percentiles_interpolate_linearly():
    values = list(range(1, 101))
    assert percentiles(values) == {"p50": 50.5, "p90": 90.1, "p99": 99.01}
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_summarize_counts_only_the_window():
    t0 = 1000.0
    records = [
        (t0 - 1.0, t0 - 0.5, 200, None),  # warm-up: ignored entirely
        (t0 - 0.2, t0 + 0.3, 200, None),  # started before, ended inside: throughput yes, latency no
        (t0 + 1.0, t0 + 1.1, 200, None),  # inside
        (t0 + 2.0, t0 + 2.4, 500, "HTTP 500: boom"),
        (t0 + 9.8, t0 + 10.5, 200, None),  # started inside, ended after: latency yes, throughput no
    ]
    res = summarize(records, t0, t0 + 10.0, concurrency=2, processes=1, cpu_s=0.5)
    assert res.completed == 2
    assert res.rps == pytest.approx(0.2)
    assert sorted(round(x) for x in res.latencies_ms) == [100, 700]
    assert res.errors == 1 and res.error_samples == ["HTTP 500: boom"]
    assert res.loadgen_cores == pytest.approx(0.05)


def test_split_spreads_connections_over_processes():
    assert split(32, 3) == [11, 11, 10]
    assert split(2, 8) == [1, 1]
    assert sum(split(128, 4)) == 128


def test_valid_answer_accepts_both_handlers_formats():
    ours = {"predictions": [{"label": str(i), "index": i, "probability": 0.1} for i in range(5)]}
    stock = {"tench": 0.5, "goldfish": 0.2, "shark": 0.1, "hen": 0.1, "cock": 0.05}
    assert valid_answer(json.dumps(ours).encode(), 5)
    assert valid_answer(json.dumps(stock).encode(), 5)
    assert not valid_answer(json.dumps(ours).encode(), 3)
    assert not valid_answer(b"<html>oops</html>", 5)
    assert not valid_answer(b"[1, 2, 3, 4, 5]", 5)


def _run(config: str, label: str, rps_by_conc: dict[int, float], errors: int = 0) -> dict:
    points = []
    for conc, rps in rps_by_conc.items():
        load = LoadResult(conc, 1, 10.0, int(rps * 10), [10.0, 20.0, 30.0], errors)
        cpu = cpu_split(rps, server=1.5, frontend=0.5, workers=0.9)
        points.append(point_summary(load, server_cpu_cores=1.5, machine_busy_cores=2.0, **cpu))
    return {"config": config, "label": label, "threads_per_worker": 1, "points": points}


def test_comparison_picks_the_best_run_and_computes_speedups():
    runs = [
        _run("ours", "ours w1", {1: 10.0, 8: 30.0}),
        _run("ours", "ours w2", {1: 8.0, 8: 36.0}),
        _run("stock", "stock w1", {1: 5.0, 8: 9.0}),
        _run("stock-tuned", "stock-tuned w2", {1: 4.0, 8: 12.0}),
        _run("stock-tuned", "stock-tuned w4", {1: 100.0, 8: 100.0}, errors=3),  # dropped requests: not a best
    ]
    rows = {r["concurrency"]: r for r in comparison_rows(runs)}
    assert rows[1]["ours"] == 10.0 and rows[1]["ours_run"] == "ours w1"
    assert rows[8]["ours"] == 36.0 and rows[8]["ours_run"] == "ours w2"
    assert rows[8]["speedup_vs_stock"] == pytest.approx(4.0)
    assert rows[8]["speedup_vs_stock_tuned"] == pytest.approx(3.0)
    assert rows["peak"]["ours"] == 36.0 and rows["peak"]["stock-tuned"] == 12.0
    table = comparison_table(runs)
    assert "| 8 | 36.0 | 9.0 | 12.0 | 4.00x | 3.00x | ours w2 | stock w1 | stock-tuned w2 |" in table
    merged = merge([{"runs": runs[:2]}, {"runs": runs[2:], "ceiling": [{"variant": "fp32"}]}])
    assert len(merged["runs"]) == 5 and merged["ceiling"] == [{"variant": "fp32"}]


def test_comparison_adds_int8_columns_only_when_int8_ran():
    runs = [
        _run("ours", "ours w1", {8: 30.0}),
        _run("ours-int8", "ours-int8 w2", {8: 60.0}),
        _run("stock", "stock w1", {8: 15.0}),
        _run("stock-tuned", "stock-tuned w2", {8: 20.0}),
    ]
    rows = {r["concurrency"]: r for r in comparison_rows(runs)}
    assert rows[8]["int8_speedup_vs_stock"] == pytest.approx(4.0)
    assert rows[8]["int8_speedup_vs_stock_tuned"] == pytest.approx(3.0)
    assert rows[8]["speedup_vs_stock"] == pytest.approx(2.0)
    table = comparison_table(runs)
    assert "| 8 | 30.0 | 15.0 | 20.0 | 2.00x | 1.50x | 60.0 | 4.00x | 3.00x |" in table
    assert "int8" not in comparison_table([r for r in runs if r["config"] != "ours-int8"])


def test_runs_table_shows_every_point_and_failures():
    runs = [
        _run("ours", "ours w1", {1: 10.0, 8: 30.0}),
        {"config": "stock", "label": "stock w1", "error": "RuntimeError: TorchServe exited"},
    ]
    table = runs_table(runs).splitlines()
    assert len(table) == 2 + 2 + 1
    # ... server cores, frontend and workers CPU ms per request, requests per server CPU-second, other cores
    row = "| ours w1 | 1 | 1 | 10.0 | 20.0 | 28.0 | 29.8 | 0 | 0.00 | 1.50 | 50.000 | 90.000 | 6.7 | 0.50 |"
    assert table[2].startswith(row)
    assert "failed: RuntimeError: TorchServe exited" in table[4]


def test_synthetic_jpeg_is_a_170kb_500x375_jpeg():
    data = synthetic_jpeg()
    assert abs(len(data) - 170_000) <= 0.02 * 170_000
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.size == (500, 375) and im.mode == "RGB"
    assert synthetic_jpeg() == data  # seeded: every run sends the same bytes
    assert len(synthetic_jpeg(target_bytes=60_000)) < len(data)


def test_index_to_name_keeps_top_k_keys_distinct():
    mapping = index_to_name(["cat", "crane", "dog", "crane"])
    assert mapping == {"0": "cat", "1": "crane (1)", "2": "dog", "3": "crane (3)"}


def test_ours_config_sets_batching_and_rejects_bad_overrides():
    base = {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 32,
        "responseTimeout": 120,
        "handler": {"amp": "fp16", "warmup_batch_sizes": [1, 32]},
    }
    raw = ours_config(base, Point(2, 8, 5), {"amp": "bf16"})
    assert (raw["minWorkers"], raw["maxWorkers"], raw["batchSize"], raw["maxBatchDelay"]) == (2, 2, 8, 5)
    assert raw["handler"] == {"amp": "bf16", "warmup_batch_sizes": [1, 8]}
    assert base["handler"]["amp"] == "fp16"  # the model's own config is left alone
    with pytest.raises(ConfigError, match="amp"):
        ours_config(base, Point(1, 8, 5), {"amp": "int4"})


def test_gpu_counts_multiply_the_points_and_the_workers():
    plan = plan_from_args(build_parser().parse_args(["--gpu", "--workers", "4", "--batch", "32", "--gpus", "1,2"]), [])
    assert plan.points == [Point(4, 32, 1, 1), Point(4, 32, 1, 2)]
    assert [p.tag for p in plan.points] == ["w4 b32 d1", "w4 b32 d1 g2"]
    base = {"batchSize": 32, "handler": {"amp": "fp16"}}
    raw = ours_config(base, Point(4, 32, 5, 2), CONFIGS["ours-eager"].handler)
    assert (raw["minWorkers"], raw["maxWorkers"]) == (8, 8)
    assert raw["handler"]["cuda_graphs"] is False and raw["handler"]["gpu_wait"] == "auto"
    threads = ["--set", "number_of_netty_threads=8", "--set", "netty_client_threads=8"]
    assert plan_from_args(build_parser().parse_args(["--gpu", *threads]), []).server_overrides == {
        "number_of_netty_threads": "8",
        "netty_client_threads": "8",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        plan_from_args(build_parser().parse_args(["--gpu", "--set", "number_of_netty_threads"]), [])
    with pytest.raises(SystemExit, match="--gpus applies to --device cuda"):
        plan_from_args(build_parser().parse_args(["--quick", "--gpus", "2"]), [])


def test_gpu_sampler_counts_the_gpus_the_workers_use():
    sampler = GpuSampler()
    sampler.enabled, sampler.util, sampler.used_mib = True, [50.0], [4000.0]
    sampler.per_pid_mib = {10: 1200.0, 11: 1300.0, 12: 1250.0, 99: 500.0}
    sampler.pid_gpu = {10: 0, 11: 1, 12: 1, 99: 0}
    summary = sampler.summary([10, 11, 12], workers=3)
    assert summary is not None and summary["gpus_used"] == 2 and summary["mem_per_worker_mib"] == 1250
    assert sampler.summary([10], workers=1)["gpus_used"] == 1
    sampler.timeline = [(1.0, {10: 1000.0, 11: 1290.0}), (2.0, {10: 1100.0}), (3.0, {10: 1180.0, 11: 1300.0})]
    assert sampler.summary([10, 11], workers=2)["mem_per_worker_growth_mib"] == 180  # the worker that grew most
    sampler.timeline = [(100.0 + t, {10: 1000.0 + t, 11: 900.0, 99: 5000.0}) for t in range(12)]
    assert sampler.summary([10, 11], workers=2)["mem_per_worker_timeline"] == [[0, 1000], [5, 1005], [10, 1010]]


def test_quick_profile_and_overrides():
    args = build_parser().parse_args(["--quick", "--concurrency", "1,4", "--amp", "bf16"])
    plan = plan_from_args(args, [])
    assert plan.device == "cpu" and list(plan.concurrency) == [1, 4]
    assert plan.points == [Point(w, 8, 5) for w in PROFILES["quick"]["workers"]]
    assert plan.amp == "bf16" and plan.freeze == "auto"
    gpu = plan_from_args(build_parser().parse_args(["--gpu"]), [])
    assert (
        gpu.device == "cuda"
        and {p.batch for p in gpu.points} == {32, 64}
        and {p.batch for p in gpu.stock_points} == {32}
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--configs", "ours,mine"])
    assert plan.configs == ["ours", "ours-int8", "stock", "stock-tuned", "litserve"]
    assert gpu.configs == ["ours", "stock", "stock-tuned", "litserve"]
    assert "ours-int8" not in plan_from_args(build_parser().parse_args(["--quick", "--device", "cuda"]), []).configs
    with pytest.raises(SystemExit, match="ours-int8 cannot run on the GPU"):
        plan_from_args(build_parser().parse_args(["--gpu", "--configs", "ours,ours-int8"]), [])
    with pytest.raises(SystemExit, match="ours-eager cannot run on the CPU"):
        plan_from_args(build_parser().parse_args(["--quick", "--configs", "ours,ours-eager"]), [])


def test_auto_workers_are_what_the_server_would_pick(monkeypatch):
    monkeypatch.setattr("servekit.bench.available_cpus", lambda: 16)
    cpu = plan_from_args(build_parser().parse_args(["--quick", "--workers", "auto"]), [])
    assert [p.workers for p in cpu.points] == [4] and [p.workers for p in cpu.stock_points] == [4]
    gpu = plan_from_args(build_parser().parse_args(["--gpu", "--workers", "auto", "--gpus", "1,2"]), [])
    # 16 CPUs: 4 workers on one GPU; 8 CPUs per GPU on two, so 2 on each (4 in all).
    assert sorted({(p.workers, p.gpus) for p in gpu.points}) == [(2, 2), (4, 1)]


def _ceiling(variant: str, amp: bool, frozen: bool, ips: float, batch: int = 8, cl: bool = True) -> dict:
    return {"variant": variant, "amp": amp, "channels_last": cl, "frozen": frozen, "batch": batch, "images_per_s": ips}


def test_auto_levers_pick_the_fastest_model_only_variant():
    plan = plan_from_args(build_parser().parse_args(["--quick"]), [])
    ceiling = [
        _ceiling("fp32", False, False, 9.0),
        _ceiling("bf16", True, False, 19.0),
        _ceiling("bf16+frozen", True, True, 21.0),
        _ceiling("fp32+frozen", False, True, 9.5),
        _ceiling("bf16+frozen", True, True, 99.0, batch=1),  # not the largest batch
        _ceiling("bf16+frozen", True, True, 99.0, cl=False),  # not the served layout
        {**_ceiling("int8+frozen", False, True, 99.0), "int8": True},  # its own configuration
        {**_ceiling("pt2 (fp32)", True, True, 99.0), "pt2": True},
    ]
    choice = choose_levers(plan, ceiling, cpu_bf16=True)
    assert (choice["amp"], choice["freeze"]) == ("bf16", True)
    assert "bf16+frozen (21.0 images/s)" in choice["why"]
    plan.freeze = False  # forced off: only unfrozen variants compete
    assert choose_levers(plan, ceiling, cpu_bf16=True)[("freeze")] is False
    assert choose_levers(plan, ceiling, cpu_bf16=True)["amp"] == "bf16"
    plan.freeze = "auto"
    assert choose_levers(plan, [], cpu_bf16=False) == {
        "amp": "off",
        "freeze": False,
        "why": "no model-only measurement: bf16 where the CPU has AVX512-BF16/AMX, not frozen",
    }


def test_schedule_does_not_rerun_a_tuned_point_equal_to_the_default(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    plan = plan_from_args(
        build_parser().parse_args(["--quick", "--workers", "1,2", "--configs", "ours,stock,stock-tuned"]), []
    )
    order = schedule(plan, default_threads=2)
    assert [(c, p.workers, same) for c, p, same in order] == [
        ("ours", 1, None),
        ("stock", 1, None),
        ("stock-tuned", 1, "stock w1 b8 d5"),
        ("ours", 2, None),
        ("stock", 2, None),
        ("stock-tuned", 2, None),
    ]
    plan = plan_from_args(build_parser().parse_args(["--quick", "--workers", "2", "--configs", "ours-int8,stock"]), [])
    assert [(c, p.workers) for c, p, _ in schedule(plan, default_threads=2)] == [("ours-int8", 2), ("stock", 2)]


def test_after_a_sigterm_no_server_starts_and_no_window_runs(tmp_path, monkeypatch):
    """The handler's SystemExit can be swallowed (it may run inside a finalizer): the servers are stopped by
    the handler itself, and the bench stops at its next server start or load window."""
    monkeypatch.setattr(serving, "_stopping", threading.Event())
    monkeypatch.setattr(serving, "_running", set())
    serving.stop_all()
    assert serving.stopping()
    with pytest.raises(serving.Terminated):
        serving._launched(tmp_path / "run")
    assert not serving._running
    plan = plan_from_args(build_parser().parse_args(["--model", "digits", "--concurrency", "1"]), [])
    with pytest.raises(serving.Terminated):
        measure(plan, serving.Serving(Target("http://127.0.0.1:1/", ((b"", "image/jpeg"),), {}), 0, tmp_path), 1, print)


def test_comparison_adds_litserve_columns_only_when_it_ran():
    runs = [
        _run("ours", "ours w1", {8: 30.0}),
        _run("stock", "stock w1", {8: 15.0}),
        _run("stock-tuned", "stock-tuned w2", {8: 20.0}),
        _run("litserve", "litserve w1", {8: 24.0}),
    ]
    rows = {r["concurrency"]: r for r in comparison_rows(runs)}
    assert rows[8]["speedup_vs_litserve"] == pytest.approx(1.25)
    table = comparison_table(runs)
    assert "| 8 | 30.0 | 15.0 | 20.0 | 24.0 | 2.00x | 1.50x | 1.25x | ours w1 |" in table
    assert "litserve" not in comparison_table(runs[:3])
