"""ResNet-50 on a GPU: TorchScript fp16 (autocast) vs AOTInductor .pt2 fp16 — export, load, throughput."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.resnet50.build import build_model, example_inputs  # noqa: E402
from servekit.artifacts import load_artifact  # noqa: E402
from servekit.config import HandlerOptions  # noqa: E402
from servekit.export import export  # noqa: E402
from servekit.inference import Engine  # noqa: E402


def throughput(engine: Engine, batch: int, seconds: float = 3.0) -> float:
    """Images/s of forward + top-k on inputs already on the GPU (median of 3 timed windows)."""
    x = torch.randn(batch, 3, 224, 224, device=engine.device).to(engine.input_dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(5):
        engine.topk(engine.forward(x), 5)
    rates = []
    for _ in range(3):
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            engine.topk(engine.forward(x), 5)
            n += batch
        torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    return sorted(rates)[1]


def main() -> int:
    """Export both formats for cuda, load each, time model-only throughput at a few batch sizes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu-formats.json"))
    parser.add_argument("--batches", default="1,32,128")
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    work = args.out.parent / "formats-build"
    model = build_model(log=lambda *_: None)
    opts = HandlerOptions(amp="fp16", channels_last=True)
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "formats": {}}
    for fmt, suffix in (("trace", ".pt"), ("pt2", ".pt2")):
        path = work / f"resnet50{suffix}"
        t0 = time.perf_counter()
        parity = export(model, example_inputs(), path, fmt, device, "fp16", log_fn=print)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = Engine(load_artifact(path, device), opts)
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        rates = {b: round(throughput(engine, int(b))) for b in args.batches.split(",")}
        report["formats"][fmt] = {
            "export_and_check_s": round(export_s, 1),
            "load_s": round(load_s, 2),
            "images_per_s": rates,
            "parity": parity.errors,
            "max_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        }
        print(fmt, report["formats"][fmt], flush=True)
        del engine
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
