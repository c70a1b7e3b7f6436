"""``servekit bench``: our handler vs TorchServe's stock image_classifier and LitServe under the same load.

servekit bench [--quick | --gpu] [sweep flags]     measure, write <out>/results.json, report.md, bench.png
servekit bench report FILE.json... [--out DIR]      merge result files and redraw the report
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from ..config import available_cpus
from ..server import parse_overrides
from ..tuning import default_workers
from .configs import CONFIGS

PROFILES: dict[str, dict[str, Any]] = {
    # A 2-core CPU machine: about 10 minutes for ours (TorchScript), ours int8, stock, stock tuned and LitServe.
    "quick": dict(
        device="cpu",
        configs=["ours", "ours-int8", "stock", "stock-tuned", "litserve"],
        workers=[1, 2],
        batch=[8],
        delay=[5],
        stock_workers=None,
        stock_batch=None,
        concurrency=[1, 8, 32],
        duration=10.0,
        warmup=2.0,
        ceiling_batch=[1, 8],
        decode_batch=[],
        micro_seconds=2.0,
        amp="auto",
        freeze="auto",
        channels_last_weights=True,
    ),
    # One H100: ours on the whole grid, the stock handler at batch 32 (run the phases as separate commands).
    "gpu": dict(
        device="cuda",
        configs=["ours", "stock", "stock-tuned", "litserve"],
        workers=[2, 4],
        batch=[32, 64],
        delay=[1],
        stock_workers=None,
        stock_batch=[32],
        concurrency=[1, 32, 128],
        duration=8.0,
        warmup=2.0,
        ceiling_batch=[1, 32, 64, 128],
        decode_batch=[32, 64],
        micro_seconds=2.0,
        amp=None,
        freeze=False,
        channels_last_weights=True,
    ),
}


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def _workers(text: str) -> list[int] | str:
    return "auto" if text.strip() == "auto" else _ints(text)


def _configs(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"configurations are {', '.join(CONFIGS)}; got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``servekit bench`` (profile values fill whatever is not given)."""
    p = argparse.ArgumentParser(
        prog="servekit bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    prof = p.add_mutually_exclusive_group()
    prof.add_argument(
        "--quick",
        dest="profile",
        action="store_const",
        const="quick",
        help="CPU profile for a small machine (the default)",
    )
    prof.add_argument("--gpu", dest="profile", action="store_const", const="gpu", help="H100 profile")
    p.add_argument("--model", default="resnet50", help="model folder under models/ (default: resnet50)")
    p.add_argument("--weights", help="state dict for the model (default: seeded random weights)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where the workers run")
    p.add_argument(
        "--configs",
        type=_configs,
        help="comma-separated: "
        + "; ".join(f"{n} ({c.help})" for n, c in CONFIGS.items())
        + "; default: the profile's",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        help="workers per device, e.g. 1,2; auto: what the server picks on this machine (servekit.tuning)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config.properties entry of every server in the run, e.g. number_of_netty_threads=8",
    )
    p.add_argument(
        "--gpus",
        type=_ints,
        help="GPUs to spread the workers over (--workers on each), e.g. 1,2: every point runs once per count",
    )
    p.add_argument("--batch", type=_ints, help="TorchServe batchSize values, e.g. 8,32")
    p.add_argument("--delay", type=_ints, help="maxBatchDelay values in ms, e.g. 5")
    p.add_argument("--stock-workers", type=_workers, help="workers for the stock runs (default: --workers)")
    p.add_argument("--stock-batch", type=_ints, help="batch sizes for the stock runs (default: --batch)")
    p.add_argument("--concurrency", type=_ints, help="concurrent requests, e.g. 1,8,32")
    p.add_argument("--duration", type=float, help="measured seconds per concurrency level")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each window")
    p.add_argument("--loadgen-procs", type=int, help="load generator processes (default: cores/4, at most 8)")
    p.add_argument(
        "--amp",
        choices=["auto", "off", "bf16", "fp16"],
        help="our handler's amp; auto: the faster of fp32/bf16 in the model-only ceiling "
        "(default: auto on CPU, model-config on GPU)",
    )
    p.add_argument("--cpu-threads", help="our handler's cpu_threads: auto or N (default: model-config)")
    p.add_argument(
        "--freeze",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve a torch.jit.freeze-d artifact with our handler (default: auto on CPU, off on GPU)",
    )
    p.add_argument(
        "--channels-last-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve (both handlers) a copy of the artifact with channels_last conv weights",
    )
    p.add_argument("--no-micro", dest="micro", action="store_false", help="skip the model-only and decode rates")
    p.add_argument("--micro-seconds", type=float, help="seconds per model-only / decode measurement")
    p.add_argument("--ceiling-batch", type=_ints, help="batch sizes for the model-only ceiling")
    p.add_argument(
        "--ceiling-threads",
        type=int,
        default=1,
        help="torch threads for the CPU model-only ceiling (default 1: a per-core rate)",
    )
    p.add_argument("--decode-batch", type=_ints, help="nvjpeg batch sizes (GPU only)")
    p.add_argument("--image-bytes", type=int, default=170_000, help="size of the synthetic JPEG")
    p.add_argument(
        "--images",
        nargs="+",
        default=[],
        metavar="PATH",
        help="send these images instead of the synthetic JPEG, each connection in turn from its own start: "
        "files and folders (their .jpg/.jpeg/.png/.webp), or 'mixed', a built-in mix of 28 RGB images "
        "from 320x240 to 12 MP (JPEG, progressive JPEG, PNG, WebP)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    p.add_argument("--keep", action="store_true", help="copy the servers' run dirs (logs) into the output")
    p.add_argument(
        "--litserve-api-servers",
        type=int,
        default=0,
        help="API server processes of the litserve configuration (default: one per inference worker, "
        "LitServe's own default)",
    )
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="sample two workers with py-spy in each run's highest-concurrency window: an SVG flame graph "
        "and a top-20 table per run in <out>/profiles/",
    )
    return p


def plan_from_args(args: argparse.Namespace, argv: list[str]) -> Any:
    """Fill unset flags from the profile and turn them into a Plan."""
    from .plan import Plan, Point

    prof = PROFILES[args.profile or "quick"]

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return prof[name] if value is None else value

    configs, on_gpu = pick("configs"), pick("device") == "cuda"
    # Configurations for the other kind of device: dropped from a profile's default, refused when asked for.
    elsewhere = [c for c in configs if (CONFIGS[c].cpu_only and on_gpu) or (CONFIGS[c].gpu_only and not on_gpu)]
    if args.configs is None:
        configs = [c for c in configs if c not in elsewhere]
    elif elsewhere:
        where = "the GPU" if on_gpu else "the CPU"
        raise SystemExit(f"servekit bench: {', '.join(elsewhere)} cannot run on {where} ({CONFIGS[elsewhere[0]].help})")
    workers, batch, delay, gpus = pick("workers"), pick("batch"), pick("delay"), args.gpus or [1]
    if gpus != [1] and not on_gpu:
        raise SystemExit("servekit bench: --gpus applies to --device cuda")
    cpus = available_cpus()

    def per_device(counts: Any, g: int) -> list[int]:
        """Workers per device at ``g`` GPUs; auto: what the server's default_workers_per_model=auto picks."""
        if counts != "auto":
            return counts
        return [default_workers(cpus, g) // g] if on_gpu else [default_workers(cpus, 0)]

    stock_workers = pick("stock_workers") or workers
    stock_batch = pick("stock_batch") or batch
    overrides: dict[str, Any] = {}
    if args.cpu_threads:
        overrides["cpu_threads"] = args.cpu_threads if args.cpu_threads == "auto" else int(args.cpu_threads)
    return Plan(
        model=args.model,
        device=pick("device"),
        configs=configs,
        points=[Point(w, b, d, g) for g in gpus for w in per_device(workers, g) for b in batch for d in delay],
        stock_points=[
            Point(w, b, d, g) for g in gpus for w in per_device(stock_workers, g) for b in stock_batch for d in delay
        ],
        concurrency=pick("concurrency"),
        duration=pick("duration"),
        warmup=pick("warmup"),
        out=args.out,
        loadgen_procs=args.loadgen_procs,
        handler_overrides=overrides,
        server_overrides=parse_overrides(args.set),
        amp=pick("amp"),
        freeze=pick("freeze"),
        channels_last_weights=pick("channels_last_weights"),
        weights=args.weights,
        micro=args.micro,
        micro_seconds=pick("micro_seconds"),
        ceiling_batches=pick("ceiling_batch"),
        ceiling_threads=args.ceiling_threads,
        decode_batches=pick("decode_batch"),
        image_bytes=args.image_bytes,
        images=args.images,
        keep=args.keep,
        litserve_api_servers=args.litserve_api_servers,
        py_spy=args.py_spy,
        command="servekit bench " + " ".join(argv),
    )


def build_report_parser() -> argparse.ArgumentParser:
    """Arguments of ``servekit bench report``."""
    p = argparse.ArgumentParser(prog="servekit bench report", description="merge and redraw bench results")
    p.add_argument(
        "files",
        nargs="+",
        type=Path,
        help="results.json files of earlier runs (e.g. one per GPU phase), merged into one report",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="folder for report.md and bench.png (default: %(default)s)",
    )
    return p


def report_main(argv: list[str]) -> int:
    """``servekit bench report``: merge result files, rewrite report.md and bench.png, print the tables."""
    from .report import merge
    from .runner import write_outputs

    args = build_report_parser().parse_args(argv)
    merged = merge([json.loads(f.read_text()) for f in args.files])
    args.out.mkdir(parents=True, exist_ok=True)
    print(write_outputs(merged, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``servekit bench`` and ``python -m servekit.bench``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .runner import execute
    from .serving import Terminated, stop_all, stopping

    def terminate(signum: int, _frame: object) -> None:
        # Stop the servers here, not in an unwinding finally: Python may run this handler inside a
        # finalizer, which swallows the exception; then the next server start raises Terminated.
        stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    plan = plan_from_args(args, argv)
    try:
        results = execute(plan)
    except Terminated:
        return 128 + signal.SIGTERM
    if stopping():  # the handler's exit was swallowed and no server start came after it
        return 128 + signal.SIGTERM
    from .report import full_report

    print("\n" + full_report(results))
    print(f"wrote {plan.out / 'results.json'}, {plan.out / 'report.md'}, {plan.out / 'bench.png'}")
    failed = [r["label"] for r in results["runs"] if r.get("error")]
    errors = sum(p["errors"] for r in results["runs"] for p in r.get("points", []))
    if failed or errors:
        print(f"problems: failed runs {failed or 'none'}; {errors} request error(s)", file=sys.stderr)
        return 1
    return 0
