"""Other JPEG layouts against libjpeg: RGB-coded (Adobe, keep_rgb), restart markers, CMYK; engine, torchvision, servekit's path."""
import io, os, sys
import numpy as np, torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
sys.path.insert(0, os.getcwd())
from servekit.config import ImageOptions
from servekit.imageheader import jpeg_frame
from servekit.nvjpeg import HardwareJpegDecoder
from servekit.vision import Preprocessor, as_uint8, check_image
dev = torch.device("cuda", 0)
RGB = ImageReadMode.RGB
def px(w, h):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 255 // (w - 1)), (yy * 255 // (h - 1)), ((xx + yy) * 3) % 256], -1).astype(np.uint8)
def enc(mode, w, h, **kw):
    b = io.BytesIO(); Image.fromarray(px(w, h)).convert(mode).save(b, "JPEG", **kw); return b.getvalue()
cases = {}
for (w, h) in ((64, 48), (500, 375)):
    for name, mode, kw in [
        ("ycbcr444", "RGB", {"subsampling": 0}), ("ycbcr420", "RGB", {"subsampling": 2}),
        ("rgb-coded 444 (keep_rgb)", "RGB", {"keep_rgb": True, "subsampling": 0}),
        ("rgb-coded default (keep_rgb)", "RGB", {"keep_rgb": True}),
        ("ycbcr420 restart every 4 blocks", "RGB", {"subsampling": 2, "restart_marker_blocks": 4}),
        ("ycbcr444 restart every row", "RGB", {"subsampling": 0, "restart_marker_rows": 1}),
        ("grey restart every row", "L", {"restart_marker_rows": 1}),
        ("cmyk", "CMYK", {}),
        ("ycbcr420 progressive", "RGB", {"subsampling": 2, "progressive": True}),
    ]:
        cases[f"{name} {w}x{h}"] = enc(mode, w, h, **kw)
hw = HardwareJpegDecoder(dev, 3)
pre = Preprocessor(ImageOptions(), dev); pre.warmup()
def md(a, b): return float((a.cpu().float() - b.float()).abs().mean()) if a.shape == b.shape else 999.0
for name, j in cases.items():
    ref = decode_jpeg(as_uint8(bytearray(j)), mode=RGB)
    f = jpeg_frame(j); d = as_uint8(bytearray(j))
    eng = "-"
    if f.hardware_header and hw.takes(d, f.hardware_header):
        eng = "%.2f" % md(hw.decode([d], [f[:2]])[0], ref); torch.cuda.synchronize()
    try:
        tv = "%.2f" % md(decode_jpeg(d, mode=RGB, device=dev), ref)
    except RuntimeError as e:
        tv = "error " + str(e).splitlines()[0][:60]
    raws = [bytearray(j)]
    out = pre.decode_many(raws, [check_image(r, pre.opts) for r in raws])[0]
    ours = "%.2f" % md(out, ref) if isinstance(out, torch.Tensor) else repr(out)
    print(f"{name:45s} hardware_header={f.hardware_header:5d} cpu_only={f.cpu_only!s:5s} engine {eng:>7s}  torchvision {tv:>7s}  servekit {ours}", flush=True)
