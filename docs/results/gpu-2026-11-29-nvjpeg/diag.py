"""Which JPEGs does nvjpeg's engine decode to torchvision's pixels? Headers-only verdict vs full-stream verdict."""
import ctypes, io, itertools, json, os, sys
import numpy as np, torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
sys.path.insert(0, os.getcwd())
from servekit.imageheader import jpeg_frame
from servekit.nvjpeg import HardwareJpegDecoder
from servekit.vision import as_uint8

dev = torch.device("cuda", 0)
def jpeg(mode, w, h, **kw):
    rng = np.random.default_rng(w * 7 + h)
    px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = io.BytesIO(); Image.fromarray(px).convert(mode).save(b, "JPEG", **kw); return b.getvalue()
rows, bad = [], []
sizes = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 65, 500]
for channels in (3, 1):
    dec = HardwareJpegDecoder(dev, channels)
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    for w, h, m, sub in itertools.product(sizes, sizes, ["RGB", "L"], [0, 2]):
        if m == "L" and sub: continue
        j = jpeg(m, w, h, subsampling=sub) if m == "RGB" else jpeg(m, w, h)
        f = jpeg_frame(j); d = as_uint8(bytearray(j))
        head = dec.takes(d, f.hardware_header) if f.hardware_header else False
        full = dec.takes(d, len(j))
        row = {"c": channels, "w": w, "h": h, "m": m, "sub": sub, "head": head, "full": full}
        if head:
            for fill in (0, 255):
                torch.cuda.synchronize()
                ours = dec.decode([d], [(w, h)])[0]
                torch.cuda.synchronize()
                theirs = decode_jpeg(d, mode=mode, device=dev)
                row[f"eq{fill}"] = bool(torch.equal(ours, theirs))
                # a second decode into memory that held other values
                junk = torch.full((1 << 20,), fill, dtype=torch.uint8, device=dev); del junk
        rows.append(row)
        if head and not (row.get("eq0") and row.get("eq255")) or head != full:
            bad.append(row)
    # a batch of mixed sizes
    js = [jpeg("RGB", w, h, subsampling=2) for w, h in [(500, 375), (64, 64), (33, 17), (16, 16), (500, 375)]]
    ds = [as_uint8(bytearray(j)) for j in js]
    ours = dec.decode(ds, [jpeg_frame(j)[:2] for j in js]); torch.cuda.synchronize()
    theirs = decode_jpeg(ds, mode=mode, device=dev)
    print("batch", channels, [bool(torch.equal(a, b)) for a, b in zip(ours, theirs)])
print("rows", len(rows), "bad", len(bad))
for b in bad[:80]: print(json.dumps(b))
json.dump(rows, open(os.environ.get("OUT", ".") + "/diag.json", "w"))
