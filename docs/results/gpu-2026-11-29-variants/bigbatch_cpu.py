import io, sys, time, resource
import numpy as np, torch
from PIL import Image
sys.path.insert(0, "/work/main")
from servekit.config import ImageOptions
from servekit.vision import Preprocessor
from servekit.batch import Batch
n, w, h = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
b = io.BytesIO(); img.save(b, "JPEG", quality=85); raw = b.getvalue()
print("jpeg bytes", len(raw))
import os
from servekit import vision
if os.environ.get("OLD"): vision._CHUNK_VALUES = 1 << 62
pre = Preprocessor(ImageOptions(), torch.device("cpu"))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
t = time.perf_counter()
batch = Batch.of([bytearray(raw) for _ in range(n)]) if hasattr(Batch, "of") else None
batch = Batch([bytearray(raw) for _ in range(n)])
out, x = pre.prepare(batch)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(f"n={n} {w}x{h}: {time.perf_counter()-t:.2f}s, peak RSS {peak} MB (start {base} MB), x {tuple(x.shape)}")
