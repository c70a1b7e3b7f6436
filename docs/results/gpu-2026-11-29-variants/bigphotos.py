"""Peak memory and time of preprocessing batches of large photos, resized all at once (old) or in chunks (now)."""
import io, json, os, resource, sys, time
import numpy as np, torch
from PIL import Image
sys.path.insert(0, os.getcwd())
from servekit import vision
from servekit.batch import Batch
from servekit.config import ImageOptions
from servekit.vision import Preprocessor
dev = torch.device(sys.argv[1])
rng = np.random.default_rng(0)
def photo(w, h):
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    b = io.BytesIO(); Image.fromarray(small).resize((w, h), Image.BILINEAR).save(b, "JPEG", quality=85); return b.getvalue()
pre = Preprocessor(ImageOptions(), dev); pre.warmup()
rows = []
for (w, h), n in [((500, 375), 32), ((4000, 3000), 8), ((4000, 3000), 32), ((8000, 5000), 8)]:
    raw = photo(w, h)
    for label, chunk in (("all at once", 1 << 62), ("chunked", 1 << 25)):
        vision._CHUNK_VALUES = chunk
        for rep in range(2):
            if dev.type == "cuda":
                torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            try:
                out, x = pre.prepare(Batch([bytearray(raw) for _ in range(n)]))
                if dev.type == "cuda": torch.cuda.synchronize()
                ok = "ok"
            except torch.OutOfMemoryError as e:
                ok = "OOM"
            dt = time.perf_counter() - t
            del x
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row = dict(size=f"{w}x{h}", n=n, resize=label, ms=round(dt * 1e3, 1), peak_mib=round(peak), result=ok)
        print(json.dumps(row), flush=True); rows.append(row)
json.dump(rows, open(os.path.join(sys.argv[2], f"bigphotos-{dev.type}.json"), "w"), indent=1)
