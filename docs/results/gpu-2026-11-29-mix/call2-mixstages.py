"""Per kind of image in the bench's mix: a worker's CPU and wall time per image for check+decode+to_batch, GPU memory."""
from __future__ import annotations
import io, json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
import torch, torchvision
from PIL import Image
from servekit.batch import Batch
from servekit.bench import corpus
from servekit.classify import ImageClassifier
from servekit.config import ClassifierOptions, ModelConfig
from servekit.hooks import MODELS_DIR
from servekit.inference import prepare_process
from servekit.vision import check_image
sys.path.insert(0, "scripts")
from gpu_stages import timed  # noqa

device = torch.device("cuda", 0)
config = ModelConfig.load(MODELS_DIR / "resnet50" / "model-config.yaml", ClassifierOptions)
opts = config.handler
prepare_process(opts, device, 4, 32)
out = {"gpu": torch.cuda.get_device_name(0), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "kinds": {}}
with tempfile.TemporaryDirectory() as tmp:
    model = torchvision.models.resnet50().eval()
    art = Path(tmp) / "model.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 224, 224)), str(art))
    clf = ImageClassifier(art, opts, device)
    clf.warmup()
mix = corpus.mixed()
kinds = {}
for im in mix:
    prog = bool(Image.open(io.BytesIO(im.body)).info.get("progressive"))
    kinds.setdefault(f"{im.content_type[6:]}{'-prog' if prog else ''} {im.width}x{im.height}", im)
sync = torch.cuda.synchronize
def measure(bodies, calls):
    headers = [check_image(r, opts) for r in bodies]
    torch.cuda.reset_peak_memory_stats()
    row = {
        "check": timed(lambda: [check_image(r, opts) for r in bodies], calls, len(bodies), sync),
        "decode": timed(lambda: clf.pre.decode_many(bodies, headers), calls, len(bodies), sync),
        "whole": timed(lambda: clf.predict(Batch(list(bodies))), calls, len(bodies), sync),
    }
    row["peak_alloc_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    row["reserved_mib"] = round(torch.cuda.memory_reserved() / 2**20)
    return row
for name, im in kinds.items():
    calls = 4 if im.width > 2000 else 15
    out["kinds"][name] = {"bytes": len(im.body), **measure([bytearray(im.body) for _ in range(32)], calls)}
    print(name, json.dumps(out["kinds"][name]), flush=True)
bodies = [bytearray(i.body) for i in mix] + [bytearray(i.body) for i in mix[:4]]
out["mix_b32"] = measure(bodies, 15)
print("mix b32", json.dumps(out["mix_b32"]), flush=True)
no12 = [bytearray(i.body) for i in mix if i.width < 4000]
no12 = (no12 * 2)[:32]
out["mix_no12mp_b32"] = measure(no12, 15)
print("mix without 12MP b32", json.dumps(out["mix_no12mp_b32"]), flush=True)
Path(os.environ.get("OUT", "."), "mixstages.json").write_text(json.dumps(out, indent=1))
