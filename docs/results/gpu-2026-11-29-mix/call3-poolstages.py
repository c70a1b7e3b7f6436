"""The decode threads on a GPU worker: wall and CPU per image by kind, threads 1 vs auto, progressive on GPU vs CPU."""
from __future__ import annotations
import dataclasses, io, json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
import torch, torchvision
from PIL import Image
from servekit import vision
from servekit.batch import Batch
from servekit.bench import corpus
from servekit.classify import ImageClassifier
from servekit.config import ClassifierOptions, ModelConfig
from servekit.hooks import MODELS_DIR
from servekit.inference import prepare_process
from servekit.imageheader import JPEG
sys.path.insert(0, "scripts")
from gpu_stages import timed  # noqa

device = torch.device("cuda", 0)
config = ModelConfig.load(MODELS_DIR / "resnet50" / "model-config.yaml", ClassifierOptions)
prepare_process(config.handler, device, 4, 32)
out = {"gpu": torch.cuda.get_device_name(0), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": {}}
with tempfile.TemporaryDirectory() as tmp:
    art = Path(tmp) / "model.pt"
    torch.jit.save(torch.jit.trace(torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224)), str(art))
    clfs = {}
    for threads in (1, "auto"):
        opts = dataclasses.replace(config.handler, decode_threads=threads)
        clfs[threads] = ImageClassifier(art, opts, device)
        clfs[threads].warmup()
mix = corpus.mixed()
def kind(im):
    prog = bool(Image.open(io.BytesIO(im.body)).info.get("progressive"))
    return f"{im.content_type[6:]}{'-prog' if prog else ''}"
sets = {}
for k in ("jpeg-prog", "png", "webp"):
    one = next(i for i in mix if kind(i) == k)
    sets[f"{k} {one.width}x{one.height} x32"] = [bytearray(one.body) for _ in range(32)]
sets["mix b32"] = [bytearray(i.body) for i in mix] + [bytearray(i.body) for i in mix[:4]]
no_prog_on_cpu = lambda self, h: (not self.gpu_decode or self._gpu_decode_failed) or h.format != JPEG or h.cpu_only  # noqa: E731
new_route = vision.Preprocessor._on_cpu
sync = torch.cuda.synchronize
for name, bodies in sets.items():
    for route in ("prog-gpu", "prog-cpu"):
        if route == "prog-gpu" and "png" in name or "webp" in name and route == "prog-gpu":
            continue
        vision.Preprocessor._on_cpu = no_prog_on_cpu if route == "prog-gpu" else new_route
        for threads, clf in clfs.items():
            row = timed(lambda: clf.predict(Batch(list(bodies))), 8, len(bodies), sync)
            key = f"{name} | {route} | threads {threads}"
            out["rows"][key] = row
            print(key, json.dumps(row), flush=True)
vision.Preprocessor._on_cpu = new_route
Path(os.environ.get("OUT", "."), "poolstages.json").write_text(json.dumps(out, indent=1))
