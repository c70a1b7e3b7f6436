"""Time from publishing a new ResNet-50 archive to the first answer from it, under load (GPU figure).

    python3 scripts/gpu_reload.py [--workers 4] [--clients 8] [--no-preload] [--out gpu-reload.json]

Writes the report to --out (with TorchServe's step timeline for v2.0) and the server's and watcher's
logs to <out stem>-logs/ beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servekit import health, preload, server  # noqa: E402
from servekit.archive import ArchiveRequest, archive  # noqa: E402
from servekit.bench.images import synthetic_jpeg  # noqa: E402
from servekit.client import InferenceClient  # noqa: E402
from servekit.hooks import MODELS_DIR  # noqa: E402
from servekit.loadcheck import CheckedLoad  # noqa: E402
from servekit.reload import watch_command  # noqa: E402
from servekit.server import private_ports as port_overrides  # noqa: E402
from servekit.tslogs import relative_timeline, worker_timeline  # noqa: E402


def model_dir_with_workers(tmp: Path, workers: int, handler: dict) -> Path:
    """A copy of models/resnet50 whose model-config asks for ``workers`` workers (and handler overrides)."""
    out = tmp / "resnet50"
    shutil.copytree(MODELS_DIR / "resnet50", out)
    cfg = yaml.safe_load((out / "model-config.yaml").read_text())
    cfg["minWorkers"] = cfg["maxWorkers"] = workers
    cfg["handler"].update(handler)
    (out / "model-config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def main() -> int:
    """Serve v1 with N workers, publish v2 under load, report publish -> first v2 answer."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs TorchServe spreads the workers over")
    parser.add_argument("--warmup", default=None, help="warm-up batch sizes, e.g. 32 (default: model-config)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true")
    parser.add_argument(
        "--preload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"preloaded workers (the default; --no-preload sets {preload.ENV}=0)",
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-reload.json"))
    args = parser.parse_args()
    os.environ[preload.ENV] = "1" if args.preload else "0"
    handler: dict = {}
    if args.warmup:
        handler["warmup_batch_sizes"] = [int(b) for b in args.warmup.split(",")]
    if args.no_cudnn_benchmark:
        handler["cudnn_benchmark"] = False
    tmp = Path(tempfile.mkdtemp(prefix="gpu-reload-"))
    staging, store = tmp / "staging", tmp / "store"
    store.mkdir()
    mdir = model_dir_with_workers(tmp, args.workers, handler)
    for version in ("1.0", "2.0"):  # the second build finds the first one's artifact up to date
        archive(ArchiveRequest("resnet50", mdir, staging, version=version))
    shutil.copy2(staging / "resnet50-v1.0.mar", store)
    cfg = server.ServerConfig(tmp / "run", store, overrides={**port_overrides(), "number_of_gpu": str(args.gpus)})
    proc = server.start(cfg, {"resnet50": "resnet50-v1.0.mar"})
    health.wait_ready(cfg, ["resnet50"], timeout=600, proc=proc)
    watcher_log = tmp / "watcher.log"
    with open(watcher_log, "wb") as out:
        watcher = subprocess.Popen(watch_command(cfg, "--interval", "0.5"), stdout=out, stderr=subprocess.STDOUT)
    body = synthetic_jpeg()
    # Labels of random weights mean nothing: an answer is right when it is a 200 with predictions.
    load = CheckedLoad(
        lambda: InferenceClient(cfg.address("inference_address"), cfg.tokens),
        "resnet50",
        [(body, None)],
        threads=args.clients,
        content_type="image/jpeg",
    )
    load.start()
    time.sleep(5)
    part = store / ".resnet50-v2.0.mar.part"
    shutil.copy2(staging / "resnet50-v2.0.mar", part)
    published, published_wall = time.monotonic(), time.time()
    part.rename(store / "resnet50-v2.0.mar")
    while load.first("2.0") is None and time.monotonic() - published < 300:
        time.sleep(0.1)
    time.sleep(5)
    load.stop()
    first_v2 = load.first("2.0")
    outcomes = load.snapshot()
    seen = Counter((o.status if o.status is not None else "error", o.version) for o in outcomes)
    watcher.terminate()
    watcher.wait(timeout=30)
    server.stop(cfg.run_dir)
    import torch

    report = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "workers": args.workers,
        "gpus": args.gpus,
        "clients": args.clients,
        "preload": preload.enabled(),
        "handler_overrides": handler,
        "publish_to_first_v2_s": round(first_v2 - published, 2) if first_v2 is not None else None,
        "responses": {f"{k[0]} v{k[1]}": n for k, n in seen.items()},
        "failed": sum(not o.ok for o in outcomes),
        "failure_samples": [f"{o.status}: {o.error}" for o in outcomes if not o.ok][:5],
        "worker_ready_lines": [
            line.split("MODEL_LOG - ")[-1]
            for log in (cfg.run_dir / "logs").glob("model_log*.log")
            for line in log.read_text(errors="replace").splitlines()
            if " ready on " in line
        ],
        # Seconds after the publish at which TorchServe logged each step for v2.0 (first and last worker).
        "v2_timeline_s": relative_timeline(worker_timeline(cfg.run_dir / "logs", "resnet50", "2.0"), published_wall),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    logs = args.out.parent / f"{args.out.stem}-logs"
    shutil.copytree(cfg.run_dir / "logs", logs, dirs_exist_ok=True)
    (logs / "watcher.log").write_bytes(watcher_log.read_bytes())
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0 if first_v2 and report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
