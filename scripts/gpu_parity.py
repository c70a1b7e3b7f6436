"""On a GPU: does fp16/bf16 autocast change the digits model's answers? (top-1 agreement with fp32)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.digits.build import example_inputs  # noqa: E402
from models.digits.model import encode, held_out, train  # noqa: E402
from servekit.classify import ImageClassifier  # noqa: E402
from servekit.config import ModelConfig  # noqa: E402
from servekit.export import export  # noqa: E402


def main() -> int:
    """Train, export, then classify every held-out digit (PNG and JPEG) with amp off, fp16, bf16."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu-parity.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda", 0)
    work = args.out.parent / "parity-build"
    artifact = work / "digits.pt"
    export(train(), example_inputs(), artifact, "trace", "cpu", "off")
    base = ModelConfig.load(Path(__file__).resolve().parent.parent / "models/digits/model-config.yaml").handler
    pairs = held_out()
    labels = [str(i) for i in range(10)]
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "n": len(pairs), "runs": {}}
    answers = {}
    for fmt in ("PNG", "JPEG"):
        raws = [encode(img, fmt) for img, _ in pairs]
        for amp in ("off", "fp16", "bf16"):
            opts = replace(base, amp=amp, decode_device="cuda", channels_last=True)
            clf = ImageClassifier(artifact, opts, device, labels)
            clf.warmup([1, 8])
            t0 = time.perf_counter()
            out = []
            for i in range(0, len(raws), 8):
                out += clf.predict(raws[i : i + 8])
            torch.cuda.synchronize()
            top1 = [r["predictions"][0]["label"] for r in out]
            answers[(fmt, amp)] = top1
            acc = sum(t == str(y) for t, (_, y) in zip(top1, pairs)) / len(pairs)
            report["runs"][f"{fmt}-{amp}"] = {
                "accuracy": acc,
                "seconds": time.perf_counter() - t0,
                "decode_on_gpu": clf.pre.gpu_decode and fmt == "JPEG",
            }
        for amp in ("fp16", "bf16"):
            agree = sum(a == b for a, b in zip(answers[(fmt, "off")], answers[(fmt, amp)])) / len(pairs)
            report["runs"][f"{fmt}-{amp}"]["top1_agreement_with_fp32"] = agree
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    worst = min(r.get("top1_agreement_with_fp32", 1.0) for r in report["runs"].values())
    return 0 if worst >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
