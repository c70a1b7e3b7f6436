"""Where a worker's time goes, stage by stage, outside TorchServe: CPU and wall time per image.

    python3 scripts/gpu_stages.py [--batches 1,32] [--calls 60] [--out stages.json]

Runs the resnet50 model-config's pipeline (random weights, traced) as a worker would after
``prepare_process``: the header check, nvjpeg's batched decode, resize/crop/normalise, the forward
pass, top-k and the JSON answer, each timed alone on a 168 KB 500x375 JPEG. Also times the header
check through PIL (what servekit used before) and nvjpeg's decode by chroma subsampling.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402

from servekit.batch import Batch  # noqa: E402
from servekit.bench.images import synthetic_jpeg  # noqa: E402
from servekit.classify import ImageClassifier, TopKJson  # noqa: E402
from servekit.config import ClassifierOptions, ModelConfig  # noqa: E402
from servekit.gpulock import GpuLock  # noqa: E402
from servekit.gpuwait import set_gpu_wait  # noqa: E402
from servekit.hooks import MODELS_DIR  # noqa: E402
from servekit.inference import prepare_process  # noqa: E402
from servekit.vision import as_uint8, check_image  # noqa: E402

WORKERS = 4  # what prepare_process sizes threads for: the default on a one-GPU host


def cpu_seconds() -> float:
    """This process's CPU time, every thread."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn: Callable[[], object], calls: int, per: int, sync: Callable[[], None]) -> dict[str, float]:
    """CPU and wall microseconds per item of ``fn`` (``per`` items a call), after 3 untimed calls."""
    for _ in range(3):
        fn()
    sync()
    c0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    n = calls * per
    return {
        "cpu_us": round((cpu_seconds() - c0) / n * 1e6, 1),
        "wall_us": round((time.perf_counter() - t0) / n * 1e6, 1),
    }


def contended_decode(args: tuple[int, float, str, str]) -> dict[str, float]:
    """One of several processes decoding batches of 32 on the same GPU at once; ``lock``: one at a time."""
    calls, start_at, wait, lock = args
    set_gpu_wait(wait, 0)
    device = torch.device("cuda", 0)
    datas = [as_uint8(bytearray(synthetic_jpeg())) for _ in range(32)]
    decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    torch.cuda.synchronize()
    time.sleep(max(0.0, start_at - time.time()))  # start together

    def decode() -> None:
        decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)

    if not lock:
        return timed(decode, calls, 32, torch.cuda.synchronize)
    gpu_lock = GpuLock(0, "nvjpeg", lock)  # what serial_gpu_decode takes around the decode

    def locked() -> None:
        with gpu_lock:
            decode()

    return timed(locked, calls, 32, torch.cuda.synchronize)


def pil_header(raw: bytearray) -> tuple[int, int]:
    """The header check as servekit did it before: PIL opens the image."""
    with Image.open(io.BytesIO(raw)) as im:
        return im.size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--procs", default="1,4", help="processes decoding at once, for the contention rows")
    p.add_argument("--contention-only", action="store_true", help="stop after the contention rows")
    p.add_argument("--no-contention", action="store_true", help="skip the contention rows")
    p.add_argument("--gpu-wait", help="override the model-config's gpu_wait (blocking, spin, yield, auto)")
    p.add_argument("--out", type=Path, default=Path("stages.json"))
    args = p.parse_args()
    device = torch.device("cuda", 0)
    config = ModelConfig.load(MODELS_DIR / "resnet50" / "model-config.yaml", ClassifierOptions)
    opts = config.handler
    assert isinstance(opts, ClassifierOptions)
    if args.gpu_wait:
        opts = dataclasses.replace(opts, gpu_wait=args.gpu_wait)
    prepare_process(opts, device, WORKERS, config.batch_size)
    sync = torch.cuda.synchronize
    out: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "gpu_wait": opts.gpu_wait,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    jpeg = bytearray(synthetic_jpeg())
    out["image_bytes"] = len(jpeg)
    out["header_check"] = {
        "pil": timed(lambda: pil_header(jpeg), 3000, 1, lambda: None),
        "servekit": timed(lambda: check_image(jpeg, opts), 3000, 1, lambda: None),
    }
    print(json.dumps(out), flush=True)

    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    out["nvjpeg_b32"] = {}
    for sub, name in ((0, "4:4:4"), (2, "4:2:0")):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90, subsampling=sub)
        datas = [as_uint8(bytearray(buf.getvalue())) for _ in range(32)]
        row = timed(lambda datas=datas: decode_jpeg(datas, mode=ImageReadMode.RGB, device=device), args.calls, 32, sync)
        out["nvjpeg_b32"][name] = {"bytes": len(buf.getvalue()), **row}
        if sub == 2:  # the same bitstreams from page-locked host memory
            pinned = [d.pin_memory() for d in datas]
            row = timed(lambda p=pinned: decode_jpeg(p, mode=ImageReadMode.RGB, device=device), args.calls, 32, sync)
            out["nvjpeg_b32"][f"{name} pinned input"] = {"bytes": len(buf.getvalue()), **row}
    print(json.dumps(out["nvjpeg_b32"]), flush=True)

    out["nvjpeg_b32_contended"] = {}
    ctx = multiprocessing.get_context("spawn")
    max_procs = max(int(x) for x in args.procs.split(","))
    lock = tempfile.mkdtemp(prefix="servekit-stages-")
    runs = [(int(x), "blocking", "") for x in args.procs.split(",")] + [(max_procs, "blocking", lock)]
    for procs, wait, locked in (runs + [(max_procs, "spin", "")] * (not args.contention_only)) * (
        not args.no_contention
    ):
        t0 = time.time()
        with ctx.Pool(procs) as pool:
            rows = pool.map(contended_decode, [(args.calls * 2, t0 + 8, wait, locked)] * procs)
        name = f"{procs}x-{wait}" + ("-locked" if locked else "")
        rate = sum(1e6 / r["wall_us"] for r in rows)  # they run side by side
        out["nvjpeg_b32_contended"][name] = {"per_process": rows, "images_per_s_all": round(rate)}
        print(name, json.dumps(out["nvjpeg_b32_contended"][name]), flush=True)
    if args.contention_only:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = torchvision.models.resnet50().eval()
        artifact = Path(tmp) / "model.pt"
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 224, 224)), str(artifact))
        clf = ImageClassifier(artifact, opts, device)
        t0 = time.perf_counter()
        clf.warmup()
        out["warmup_s"] = round(time.perf_counter() - t0, 2)
    out["stages"] = {}
    as_json = TopKJson(clf.labels)
    for b in (int(x) for x in args.batches.split(",")):
        bodies = [bytearray(jpeg) for _ in range(b)]
        headers = [check_image(r, opts) for r in bodies]
        images = clf.pre.decode_many(bodies, headers)
        x = clf.pre.to_batch(images)  # type: ignore[arg-type]
        logits = clf.engine.forward(x)
        top = clf.engine.topk(logits, opts.topk)

        def answers(top=top) -> list[str]:  # as the handler writes them
            return [as_json.encode(i, p) for i, p in zip(top.indices, top.probs)]

        stages: dict[str, Callable[[], object]] = {
            "check": lambda bodies=bodies: [check_image(r, opts) for r in bodies],
            "decode": lambda bodies=bodies, headers=headers: clf.pre.decode_many(bodies, headers),
            "to_batch": lambda images=images: clf.pre.to_batch(images),
            "forward": lambda x=x: clf.engine.forward(x),
            "topk": lambda logits=logits: clf.engine.topk(logits, opts.topk),
            "answers": answers,
            "whole": lambda bodies=bodies: clf.predict(Batch(list(bodies))),
        }
        out["stages"][f"b{b}"] = {name: timed(fn, args.calls, b, sync) for name, fn in stages.items()}
        print(b, json.dumps(out["stages"][f"b{b}"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
