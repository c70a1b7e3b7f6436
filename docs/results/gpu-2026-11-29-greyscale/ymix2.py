"""nvjpeg batched hardware decode: does an image decode the same in a batch as alone? And how far is the GPU from libjpeg?"""
import io, itertools, os, random, sys
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
def jpeg(mode, w, h, seed=None, smooth=False, **kw):
    rng = np.random.default_rng(w * 7 + h if seed is None else seed)
    if smooth:
        yy, xx = np.mgrid[0:h, 0:w]
        px = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    else:
        px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = io.BytesIO(); Image.fromarray(px).convert(mode).save(b, "JPEG", **kw); return b.getvalue()
dec = decoder(3)
def ours(js):
    ds = [as_uint8(bytearray(j)) for j in js]; fr = [jpeg_frame(j) for j in js]
    assert all(f.hardware_header and dec.takes(d, f.hardware_header, f.width, f.height) for d, f in zip(ds, fr))
    junk = torch.full((64 << 20,), 0xAB, dtype=torch.uint8, device=dev); del junk
    out = dec.decode(ds, [f[:2] for f in fr]); torch.cuda.synchronize(); return [o.clone() for o in out]
def tv(js):
    junk = torch.full((64 << 20,), 0xAB, dtype=torch.uint8, device=dev); del junk
    out = decode_jpeg([as_uint8(bytearray(j)) for j in js], mode=RGB, device=dev); torch.cuda.synchronize(); return out
cases = [((w, h, mode, kw.get('subsampling'), kw.get('quality'), sm), jpeg(mode, w, h, smooth=sm, **kw)) for (w, h), mode, kw, sm in itertools.product(
    [(1, 1), (7, 5), (33, 17), (500, 375), (375, 500)], ["RGB", "L"],
    [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2, "quality": 60}], [False, True])]
single_o = {l: ours([j])[0] for l, j in cases}
single_t = {l: tv([j])[0] for l, j in cases}
print("singles, ours == torchvision:", sum(torch.equal(single_o[l], single_t[l]) for l, _ in cases), "of", len(cases))
for l, j in cases:
    ref = decode_jpeg(as_uint8(bytearray(j)), mode=RGB).float()
    d = (single_o[l].cpu().float() - ref).abs()
    print("vs libjpeg", l, "mean %.2f max %d" % (float(d.mean()), int(d.max())))
def consistency(name, batches):
    n = bo = bt = 0; ex = []
    for labels in batches:
        js = [dict(cases)[l] for l in labels]
        o, t = ours(js), tv(js)
        for l, a, b in zip(labels, o, t):
            n += 1
            if not torch.equal(a, single_o[l]): bo += 1; len(ex) < 4 and ex.append(("ours", l, float((a.float()-single_o[l].float()).abs().mean())))
            if not torch.equal(b, single_t[l]): bt += 1; len(ex) < 8 and ex.append(("tv", l))
    print(f"{name}: images {n}, differ from their single decode: ours {bo}, torchvision {bt}; {ex}", flush=True)
labels = [l for l, _ in cases]
def orders(ls, k):
    out = []
    for t in range(k):
        x = list(ls); random.Random(t).shuffle(x); out.append(x)
    return out
consistency("all 60 cases", orders(labels, 10))
consistency("sides >= 16", orders([l for l in labels if min(l[:2]) >= 16], 10))
consistency("sides >= 16, RGB only", orders([l for l in labels if min(l[:2]) >= 16 and l[2] == "RGB"], 10))
consistency("sides >= 16, L only", orders([l for l in labels if min(l[:2]) >= 16 and l[2] == "L"], 10))
consistency("sides < 16 only", orders([l for l in labels if min(l[:2]) < 16], 10))
consistency("big only", orders([l for l in labels if min(l[:2]) >= 375], 10))
