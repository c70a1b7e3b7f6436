#!/usr/bin/env bash
# The benchmark on the GPU host: our handler vs TorchServe's stock image_classifier.
# Run from the repository root. Results (results.json, report.md, bench.png, bench.log) go to $OUT.
#
#   bash scripts/gpu_bench.sh ours    # model-only + decode ceilings, our handler on the whole grid (estimated ~5 min)
#   bash scripts/gpu_bench.sh stock   # stock handler, untuned and tuned threads (estimated ~4 min)
#   bash scripts/gpu_bench.sh all     # both in one go (estimated ~9 min; may not fit a 10-minute command limit)
#   bash scripts/gpu_bench.sh profile # ours, the no-op floor and tuned stock at w4 b32, c=1 and 128, with the
#                                     # frontend/worker CPU split and py-spy profiles of the workers (~6 min)
#   bash scripts/gpu_bench.sh pt2     # TorchScript fp16 vs the AOTInductor .pt2 (fp16 baked in), 4 workers,
#                                     # batch 32, end to end + model-only (not yet run: estimated ~4 min)
#   bash scripts/gpu_bench.sh graphs  # our handler with and without CUDA graphs + blocking waits (~4 min)
#   bash scripts/gpu_bench.sh gpus    # one GPU against all of them (2 on a two-GPU host), one run (~4 min)
#   bash scripts/gpu_bench.sh peer    # ours, tuned stock and the LitServe peer at w4 b32, side by side (~5 min;
#                                     # first put the peer's wheels in .gpu: bash scripts/gpu_peer_wheels.sh)
#   bash scripts/gpu_bench.sh mix     # ours (with and without decode threads), tuned stock and LitServe on the
#                                     # built-in mix of 28 images, 320x240 to 12 MP (~5.5 min)
#   bash scripts/gpu_bench.sh reload  # a 4-worker switch under load, plain then with preloaded workers (~2 min)
#   bash scripts/gpu_bench.sh workercpu # ours, ours-unbuffered (TorchServe's own reader and parser) and
#                                     # ours-serial-decode (one nvjpeg decode at a time per GPU), w4 b32, c=1 and
#                                     # 256, with the frontend/worker CPU split (~6 min)
#   bash scripts/gpu_bench.sh stages  # a worker's stages outside TorchServe, and nvjpeg with 1 and 4 decoding
#                                     # processes, plain and one at a time (scripts/gpu_stages.py, ~1.5 min)
#
# Then, on any machine, merge the phases into one table and plot:
#   python3 -m servekit.bench report ours/results.json stock/results.json --out bench-results/gpu
bash .gpu/setup.sh && . /tmp/gpu-env.sh
set -euo pipefail

phase=${1:-all}
out=${OUT:-bench-results/gpu}
mkdir -p "$out"
# Absolute: TorchServe's workers import servekit from their own working directories.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python3 - <<'PY'
import importlib, shutil, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for mod in ("ts.model_server", "model_archiver", "captum", "pynvml", "matplotlib"):
    importlib.import_module(mod)
print("java on PATH:", shutil.which("java"))
PY
# TorchServe finds GPUs through nvidia-smi: without it every worker would run on the CPU.
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ "$phase" = stages ]; then
  python3 scripts/gpu_stages.py --out "$out/stages.json" 2>&1 | grep -v Warning | tee "$out/stages.log"
  exit 0
fi
if [ "$phase" = reload ]; then
  python3 scripts/gpu_reload.py --workers 4 --no-preload --out "$out/reload-plain.json" 2>&1 | tail -n 40 | tee "$out/reload.log"
  python3 scripts/gpu_reload.py --workers 4 --out "$out/reload-preload.json" 2>&1 | tail -n 40 | tee -a "$out/reload.log"
  exit 0
fi
case "$phase" in
  ours)  args=(--gpu --configs ours) ;;
  stock) args=(--gpu --configs stock,stock-tuned --no-micro) ;;
  all)   args=(--gpu) ;;
  pt2)   args=(--gpu --configs ours,ours-pt2 --workers 4 --batch 32 --concurrency 1,128) ;;
  graphs) args=(--gpu --configs ours,ours-eager --workers 4 --batch 32 --concurrency 1,128,256 --freeze --no-micro) ;;
  gpus)  args=(--gpu --configs ours --workers 4 --batch 32 --gpus "1,$(nvidia-smi -L | wc -l)" --concurrency 256,512
           --freeze --no-micro) ;;
  mix)   args=(--gpu --configs ours,ours-one-decode-thread,stock-tuned,litserve --workers 4 --batch 32 --concurrency 1,256
           --duration 10 --warmup 3 --freeze --no-micro --images mixed) ;;
  peer)  args=(--gpu --configs ours,stock-tuned,litserve --workers 4 --batch 32 --concurrency 1,128,256 --freeze
           --no-micro) ;;
  workercpu) args=(--gpu --configs ours,ours-unbuffered,ours-serial-decode --workers 4 --batch 32
           --concurrency 1,256 --duration 10 --freeze --no-micro) ;;
  profile) args=(--gpu --configs ours,noop,stock-tuned --workers 4 --batch 32 --concurrency 1,128 --duration 12
           --no-micro --py-spy) ;;
  *)     echo "usage: $0 [ours|stock|all|pt2|graphs|gpus|peer|mix|profile|workercpu|stages|reload]" >&2; exit 2 ;;
esac
python3 -m servekit.bench "${args[@]}" --out "$out" 2>&1 | tee "$out/bench.log"
