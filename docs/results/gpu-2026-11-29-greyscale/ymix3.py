"""nvjpeg on the GPU against libjpeg: which layouts decode wrong, and do they spoil their batch neighbours?"""
import io, os, random, sys
import numpy as np, torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), ".gpux"))
from servekit import nvjpeg
from servekit.imageheader import jpeg_frame
from servekit.vision import as_uint8
from ychan import decoder
dev = torch.device("cuda", 0)
nvjpeg.MIN_SIDE = 0
RGB = ImageReadMode.RGB
def px(w, h, seed, smooth):
    if smooth:
        yy, xx = np.mgrid[0:h, 0:w]
        return np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
def enc(mode, w, h, seed, smooth=True, **kw):
    b = io.BytesIO(); Image.fromarray(px(w, h, seed, smooth)).convert(mode).save(b, "JPEG", **kw); return b.getvalue()
def grey_factors(j, f):
    sof = j.find(b"\xff\xc0"); sof = sof if sof >= 0 else j.index(b"\xff\xc2")
    at = sof + 2 + 8 + 1  # marker, length..components, component id
    return j[:at] + bytes([f]) + j[at + 1:]
def cpu(j): return decode_jpeg(as_uint8(bytearray(j)), mode=RGB)
dec = decoder(3)
def ours(js):
    ds = [as_uint8(bytearray(j)) for j in js]; fr = [jpeg_frame(j) for j in js]
    for d, f in zip(ds, fr): assert dec.takes(d, f.hardware_header or len(d), f.width, f.height), f
    junk = torch.full((64 << 20,), 0xAB, dtype=torch.uint8, device=dev); del junk
    out = dec.decode(ds, [f[:2] for f in fr]); torch.cuda.synchronize(); return [o.cpu() for o in out]
def tv(js):
    junk = torch.full((64 << 20,), 0xAB, dtype=torch.uint8, device=dev); del junk
    out = decode_jpeg([as_uint8(bytearray(j)) for j in js], mode=RGB, device=dev); torch.cuda.synchronize(); return [o.cpu() for o in out]
def md(a, b): return float((a.float() - b.float()).abs().mean()) if a.shape == b.shape else 999.0

print("== single-component JPEGs by sampling factor, alone: mean |GPU - libjpeg|")
for f in () if os.environ.get("SKIP_SINGLES") else (0x11, 0x12, 0x21, 0x22, 0x41, 0x14, 0x44):
    for (w, h) in ((1, 1), (7, 5), (33, 17), (500, 375)):
        for smooth in (True, False):
            base = enc("L", w, h, w + h, smooth)
            j = grey_factors(base, f)
            ref, ref0 = cpu(j), cpu(base)
            row = [f"{f:#x}", (w, h), "smooth" if smooth else "noise", "libjpeg same as 1x1: %s" % torch.equal(ref, ref0)]
            row.append("ours %.2f" % md(ours([j])[0], ref)); row.append("tv %.2f" % md(tv([j])[0], ref))
            prog = grey_factors(enc("L", w, h, w + h, smooth, progressive=True), f)
            row.append("tv progressive %.2f" % md(tv([prog])[0], cpu(prog)))
            print(*row, flush=True)
rnd = random.Random(3)
def item(lo, hi, t, k, bad_grey=False):
    w, h = rnd.randint(lo, hi), rnd.randint(lo, hi)
    if bad_grey:
        return ("grey22", w, h), grey_factors(enc("L", w, h, t * 100 + k, True), 0x22)
    m = rnd.choice(["RGB444", "RGB422", "RGB420", "L"])
    if m == "L": return (m, w, h), enc("L", w, h, t * 100 + k, rnd.random() < 0.5)
    return (m, w, h), enc("RGB", w, h, t * 100 + k, rnd.random() < 0.5, subsampling={"RGB444": 0, "RGB422": 1, "RGB420": 2}[m])
def batches(name, lo, hi, n, with_bad):
    stats = {"ours": [0, 0], "tv": [0, 0]}; ex = []
    for t in range(n):
        items = [item(lo, hi, t, k) for k in range(31)] + [item(lo, hi, t, 31, bad_grey=with_bad)] if with_bad else [item(lo, hi, t, k) for k in range(32)]
        js = [j for _, j in items]
        singles = [ours([j])[0] for j in js]
        for who, fn in (("ours", ours), ("tv", tv)):
            outs = fn(js)
            for (lab, j), o, s in zip(items, outs, singles):
                if lab[0] == "grey22": continue
                ref = cpu(j)
                exact = lab[0] in ("RGB444", "L")
                good = torch.equal(o, ref) if exact else torch.equal(o, s)
                stats[who][0] += 1; stats[who][1] += 0 if good else 1
                if not good and len(ex) < 6: ex.append((who, lab, round(md(o, ref), 2)))
    print(f"== {name}: images judged {stats['ours'][0]}: wrong ours {stats['ours'][1]}, torchvision {stats['tv'][1]}; {ex}", flush=True)
batches("sides 1-600, no odd greyscale", 1, 600, 25, False)
batches("sides 1-15, no odd greyscale", 1, 15, 25, False)
batches("sides 16-600, one 2x2 greyscale per batch", 16, 600, 25, True)
batches("sides 1-600, one 2x2 greyscale per batch", 1, 600, 25, True)
