"""Can this machine's torch load an AOTInductor package on the GPU? Each attempt runs in a fresh
process with faulthandler on, so a segfault is a result (its trace), not the end of the probe.

    python scripts/pt2_probe.py --out results/pt2-probe.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What one child does: compile a tiny conv net into a package, or load one a given way and run it.
CHILD = r"""
import faulthandler, sys, time, torch
faulthandler.enable(all_threads=True)
what, path, device = sys.argv[1], sys.argv[2], sys.argv[3]
dev = torch.device(device)

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 4)
    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))

x = torch.randn(2, 3, 16, 16, device=dev)
t0 = time.perf_counter()
if what == "compile":
    torch.manual_seed(0)
    m = Tiny().to(dev).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: batch},))
    torch._inductor.aoti_compile_and_package(ep, package_path=path)
elif what == "aoti_load_package":
    runner = torch._inductor.aoti_load_package(path)
    print("output", tuple(runner(x).shape))
elif what == "aoti_load_package_device0":
    runner = torch._inductor.aoti_load_package(path, device_index=0)
    print("output", tuple(runner(x).shape))
elif what == "aoti_load_package_single_thread":
    runner = torch._inductor.aoti_load_package(path, run_single_threaded=True)
    print("output", tuple(runner(x).shape))
elif what == "loader_direct":
    loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, 0 if device == "cuda" else -1)
    print("output", tuple(loader.boxed_run([x])[0].shape))
print(f"{what} ok in {time.perf_counter() - t0:.1f} s")
"""

ATTEMPTS = ("aoti_load_package", "aoti_load_package_device0", "aoti_load_package_single_thread", "loader_direct")


def attempt(what: str, path: Path, device: str, timeout: float) -> dict:
    """Run one child; its exit code, signal and the tail of its output."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, what, str(path), device], capture_output=True, text=True, timeout=timeout
        )
        code, out = proc.returncode, (proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as exc:
        code, out = None, f"timed out after {timeout} s: {exc.stdout or ''}{exc.stderr or ''}"
    return {
        "attempt": what,
        "returncode": code,
        "signal": -code if code is not None and code < 0 else None,
        "seconds": round(time.monotonic() - t0, 1),
        "output_tail": out[-3000:],
    }


def main() -> int:
    """Compile once, then try every way of loading; write what happened as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("pt2-probe.json"))
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--attempts", default=",".join(ATTEMPTS), help=f"comma-separated, of {ATTEMPTS}")
    args = ap.parse_args()
    attempts = [a for a in args.attempts.split(",") if a]
    unknown = sorted(set(attempts) - set(ATTEMPTS))
    if unknown:
        ap.error(f"unknown attempts {unknown}; known: {ATTEMPTS}")
    import torch

    results: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device, "attempts": []}
    if args.device == "cuda" and torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "tiny.pt2"
        for what in ["compile", *attempts]:
            if what != "compile" and not pkg.exists():
                break
            results["attempts"].append(attempt(what, pkg, args.device, args.timeout * (2 if what == "compile" else 1)))
            # Written after every attempt: a probe cut off by its caller keeps what it found.
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            done = results["attempts"][-1]
            print(json.dumps({k: v for k, v in done.items() if k != "output_tail"}))
            if done["returncode"] != 0:
                print(done["output_tail"][-1500:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
