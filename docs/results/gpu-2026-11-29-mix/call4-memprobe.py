"""GPU memory of one classifier serving random batches of 32 from the mix: torch's reserve vs the process's total."""
from __future__ import annotations
import json, os, random, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
import pynvml, torch, torchvision
from servekit.batch import Batch
from servekit.bench import corpus
from servekit.classify import ImageClassifier
from servekit.config import ClassifierOptions, ModelConfig
from servekit.hooks import MODELS_DIR
from servekit.inference import prepare_process

pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
def proc_mib():
    return next((p.usedGpuMemory / 2**20 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid == os.getpid()), 0)
device = torch.device("cuda", 0)
config = ModelConfig.load(MODELS_DIR / "resnet50" / "model-config.yaml", ClassifierOptions)
prepare_process(config.handler, device, 4, 32)
mode = sys.argv[1]
with tempfile.TemporaryDirectory() as tmp:
    art = Path(tmp) / "model.pt"
    torch.jit.save(torch.jit.trace(torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224)), str(art))
    opts = config.handler
    if mode == "tvjpeg":
        import dataclasses
        opts = dataclasses.replace(opts, hardware_jpeg=False)
    clf = ImageClassifier(art, opts, device)
    clf.warmup()
rows = [{"after": "warmup", "nvml": proc_mib(), "reserved": torch.cuda.memory_reserved() / 2**20}]
mix = corpus.mixed()
if mode == "small":
    mix = [i for i in mix if i.width < 4000]
rng = random.Random(0)
for n in range(1, 301):
    bodies = [bytearray(rng.choice(mix).body) for _ in range(32)]
    clf.predict(Batch(bodies))
    if n in (1, 10, 50, 100, 200, 300):
        torch.cuda.synchronize()
        rows.append({"after": n, "nvml": round(proc_mib()), "reserved": round(torch.cuda.memory_reserved() / 2**20),
                     "max_alloc": round(torch.cuda.max_memory_allocated() / 2**20)})
print(mode, json.dumps(rows), flush=True)
