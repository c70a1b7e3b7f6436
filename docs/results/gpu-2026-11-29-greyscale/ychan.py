"""One-channel (Y) output from nvjpeg's hardware decoder in mixed batches: which images come back unwritten?"""
import io, os, random, sys, json
import numpy as np, torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
sys.path.insert(0, os.getcwd())
from servekit import nvjpeg
from servekit.imageheader import jpeg_frame
from servekit.nvjpeg import HardwareJpegDecoder
from servekit.vision import as_uint8

dev = torch.device("cuda", 0)
Y = 2
def jpeg(mode, w, h, seed, **kw):
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = io.BytesIO(); Image.fromarray(px).convert(mode).save(b, "JPEG", **kw); return b.getvalue()

def decoder(channels):
    d = HardwareJpegDecoder.__new__(HardwareJpegDecoder)
    HardwareJpegDecoder.__init__  # noqa
    d.device, d.channels, d.lib = dev, channels, nvjpeg._library()
    import ctypes
    d.handle, d.state = ctypes.c_void_p(), ctypes.c_void_p()
    d._call("nvjpegCreateEx", 3, None, None, 0, ctypes.byref(d.handle))
    d._call("nvjpegJpegStateCreate", d.handle, ctypes.byref(d.state))
    d.jpeg_stream = ctypes.c_void_p()
    d._call("nvjpegJpegStreamCreate", d.handle, ctypes.byref(d.jpeg_stream))
    d.done = torch.cuda.Event()
    return d

def run(min_side, max_side, trials, batch, out_kind, fill):
    nvjpeg._OUTPUT_RGB = Y if out_kind == 1 else 3
    dec = decoder(out_kind)
    mode = ImageReadMode.GRAY if out_kind == 1 else ImageReadMode.RGB
    rnd = random.Random(min_side * 1000 + out_kind)
    bad = []
    total = 0
    for t in range(trials):
        js, meta = [], []
        for k in range(batch):
            w, h = rnd.randint(min_side, max_side), rnd.randint(min_side, max_side)
            m = rnd.choice(["RGB444", "RGB420", "RGB422", "L"])
            kw = {} if m == "L" else {"subsampling": {"RGB444": 0, "RGB422": 1, "RGB420": 2}[m]}
            js.append(jpeg("L" if m == "L" else "RGB", w, h, t * 100 + k, **kw)); meta.append((w, h, m))
        ds = [as_uint8(bytearray(j)) for j in js]
        fr = [jpeg_frame(j) for j in js]
        ok = [dec.takes(d, f.hardware_header, f.width, f.height) if f.hardware_header else False for d, f in zip(ds, fr)]
        nvjpeg.MIN_SIDE = 0
        idx = [i for i, o in enumerate(ok) if o]
        # poison the caching allocator with the fill value
        junk = torch.full((64 << 20,), fill, dtype=torch.uint8, device=dev); del junk
        outs = dec.decode([ds[i] for i in idx], [fr[i][:2] for i in idx]); torch.cuda.synchronize()
        theirs = decode_jpeg([ds[i] for i in idx], mode=mode, device=dev)
        for i, a, b in zip(idx, outs, theirs):
            total += 1
            if not torch.equal(a, b):
                diff = (a.int() - b.int()).abs()
                bad.append({"trial": t, "pos": i, "meta": meta[i], "max": int(diff.max()), "frac": float((diff > 0).float().mean()), "allfill": bool((a == fill).all())})
    return total, bad

if __name__ == "__main__":
    nvjpeg.MIN_SIDE = 0
    res = {}
    for out_kind in (1, 3):
        for lo, hi in ((1, 8), (1, 40), (16, 600)):
            for fill in (0xAB,):
                total, bad = run(lo, hi, 40 if hi < 100 else 60, 32, out_kind, fill)
                key = f"out{out_kind}-sides{lo}-{hi}"
                res[key] = {"decoded": total, "bad": len(bad), "examples": bad[:12]}
                print(key, "decoded", total, "bad", len(bad), bad[:6], flush=True)
    json.dump(res, open(os.environ.get("OUT", ".") + "/ychan.json", "w"), indent=1)
