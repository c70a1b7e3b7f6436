"""The unit test's 30 mixed cases decoded to one channel (Y) in one batch, several orders and fills."""
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
def jpeg(mode, w, h, **kw):
    rng = np.random.default_rng(w * 7 + h)
    px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = io.BytesIO(); Image.fromarray(px).convert(mode).save(b, "JPEG", **kw); return b.getvalue()
cases = [(w, h, mode, kw, jpeg(mode, w, h, **kw)) for (w, h), mode, kw in itertools.product(
    [(1, 1), (7, 5), (33, 17), (500, 375), (375, 500)], ["RGB", "L"],
    [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2, "quality": 60}])]
nvjpeg.MIN_SIDE = 0
for out_kind in (1, 3):
    nvjpeg._OUTPUT_RGB = 2 if out_kind == 1 else 3
    dec = decoder(out_kind)
    mode = ImageReadMode.GRAY if out_kind == 1 else ImageReadMode.RGB
    for trial in range(12):
        order = list(range(len(cases)))
        if trial: random.Random(trial).shuffle(order)
        fill = (0, 0xAB, 0xFF)[trial % 3]
        junk = torch.full((64 << 20,), fill, dtype=torch.uint8, device=dev); del junk
        ds = [as_uint8(bytearray(cases[i][4])) for i in order]
        fr = [jpeg_frame(cases[i][4]) for i in order]
        taken = [k for k, (d, f) in enumerate(zip(ds, fr)) if f.hardware_header and dec.takes(d, f.hardware_header, f.width, f.height)]
        outs = dec.decode([ds[k] for k in taken], [fr[k][:2] for k in taken]); torch.cuda.synchronize()
        theirs = decode_jpeg([ds[k] for k in taken], mode=mode, device=dev)
        bad = [(cases[order[k]][:4], int((a.int()-b.int()).abs().max()), bool((a == fill).all()), k) for k, a, b in zip(taken, outs, theirs) if not torch.equal(a, b)]
        print("out", out_kind, "trial", trial, "fill", fill, "taken", len(taken), "bad", bad, flush=True)
