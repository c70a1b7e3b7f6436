"""Batch 1 and 32 on the GPU by artifact variant: frozen fp32 channels_last weights (what the bench serves), NCHW, fp16-baked (docs/results/gpu-2026-11-29-arena)."""
import dataclasses, json, sys, tempfile, time, warnings
from pathlib import Path
sys.path.insert(0, ".")
warnings.simplefilter("ignore")
import torch, torchvision
from torch.fx.experimental.optimization import fuse
from servekit.batch import Batch
from servekit.bench.images import synthetic_jpeg
from servekit.bench.micro import derived_artifact
from servekit.classify import ImageClassifier
from servekit.config import ClassifierOptions, ModelConfig
from servekit.hooks import MODELS_DIR
from servekit.inference import prepare_process

device = torch.device("cuda", 0)
config = ModelConfig.load(MODELS_DIR / "resnet50" / "model-config.yaml", ClassifierOptions)
base = config.handler
prepare_process(base, device, 4, 32)
jpeg = bytearray(synthetic_jpeg())
tmp = Path(tempfile.mkdtemp())
torch.manual_seed(0)
model = torchvision.models.resnet50().eval()
torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 224, 224)), str(tmp / "base.pt"))
derived_artifact(tmp / "base.pt", tmp / "v1.pt", channels_last=True, freeze=True)
derived_artifact(tmp / "base.pt", tmp / "v2.pt", freeze=True)
fused = fuse(model)
for name, cl in (("v4", True), ("v5", False)):
    m = fused.cuda().half()
    x = torch.randn(1, 3, 224, 224, device="cuda").half()
    if cl:
        m = m.to(memory_format=torch.channels_last); x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t = torch.jit.freeze(torch.jit.trace(m, x).eval())
    torch.jit.save(t, str(tmp / f"{name}.pt"))
    fused = fuse(model)
def pct(v, q): v = sorted(v); return round(v[int(q * (len(v) - 1))] * 1e3, 3)
res = {}
ref = None
for art, cl in (("v1", True), ("v2", False), ("v4", True), ("v5", False), ("v1", True)):
    opts = dataclasses.replace(base, channels_last=cl)
    clf = ImageClassifier(tmp / f"{art}.pt", opts, device, as_json=True)
    clf.warmup()
    for b in (1, 32):
        bodies = Batch([bytearray(jpeg) for _ in range(b)])
        _, x = clf.pre.prepare(bodies, into=clf.engine.input_buffer)
        for name, fn in (("infer", lambda: clf.engine.infer(x, to_host=True)), ("predict", lambda: clf.predict(bodies))):
            for _ in range(10): fn()
            ts = []
            for _ in range(300 if b == 1 else 80):
                t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
            k = f"{art} cl={cl} b{b} {name}"
            res[k] = {"p50_ms": pct(ts, .5), "p90_ms": pct(ts, .9)}
            print(k, res[k], flush=True)
    out = clf.engine.forward(x).float()
    if ref is None: ref = out
    print(art, "rel err vs v1:", float((out - ref).abs().max() / ref.abs().max()), flush=True)
    del clf; torch.cuda.empty_cache()
print(json.dumps(res))
