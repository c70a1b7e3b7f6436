"""Write JPEG variants of one photo-like image to a folder (cjpeg 2.1 for arithmetic, imagecodecs for 12-bit/lossless)."""
import io, os, subprocess, sys
import numpy as np
from PIL import Image
import imagecodecs
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
h, w = 375, 500
yy, xx = np.mgrid[0:h, 0:w]
rng = np.random.default_rng(0)
px = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 255 // (w + h))], -1).astype(np.int16)
px = np.clip(px + rng.integers(-20, 20, px.shape), 0, 255).astype(np.uint8)
ppm = os.path.join(out, "src.ppm"); Image.fromarray(px).save(ppm)
pgm = os.path.join(out, "src.pgm"); Image.fromarray(px).convert("L").save(pgm)
def cj(name, *args, src=ppm):
    subprocess.run(["cjpeg", *args, "-outfile", os.path.join(out, name + ".jpg"), src], check=True)
cj("baseline420")
cj("progressive", "-progressive")
cj("arith", "-arithmetic")
cj("arith_progressive", "-arithmetic", "-progressive")
cj("arith_grey", "-arithmetic", src=pgm)
cj("s440", "-sample", "1x2")
cj("s411", "-sample", "4x1")
cj("s410", "-sample", "4x2")
cj("s444", "-sample", "1x1")
cj("restart", "-restart", "1")
cj("optimize", "-optimize")
cj("extended", "-quality", "3")
cj("rgbcoded", "-rgb")
cj("smooth_dct_float", "-dct", "float", "-smooth", "10")
w12 = (px.astype(np.uint16) * 16)
def ic(name, data, **kw):
    open(os.path.join(out, name + ".jpg"), "wb").write(imagecodecs.jpeg8_encode(data, **kw))
ic("bits12", w12, bitspersample=12)
ic("bits12_grey", w12[..., 0].copy(), bitspersample=12)
ic("lossless", px, lossless=True)
ic("lossless_grey", px[..., 0].copy(), lossless=True)
ic("lossless12", w12, lossless=True, bitspersample=12)
ic("lossless16", px.astype(np.uint16) * 257, lossless=True, bitspersample=16)
ic("cmyk", np.concatenate([px, px[..., :1]], -1), colorspace="cmyk", outcolorspace="cmyk")
ic("ycck", np.concatenate([px, px[..., :1]], -1), colorspace="cmyk", outcolorspace="ycck")
b = io.BytesIO(); Image.fromarray(px).convert("CMYK").save(b, "JPEG"); open(os.path.join(out, "pil_cmyk.jpg"), "wb").write(b.getvalue())
os.remove(ppm); os.remove(pgm)
print(sorted(os.listdir(out)))
def patch(src, dst, old, new):
    b = bytearray(open(os.path.join(out, src), "rb").read())
    i = b.index(bytes([0xFF, old])); b[i + 1] = new
    open(os.path.join(out, dst), "wb").write(b)
patch("extended.jpg", "sof0_dqt16.jpg", 0xC1, 0xC0)
patch("baseline420.jpg", "sof1_dqt8.jpg", 0xC0, 0xC1)
Image.fromarray(px).save(ppm)
cj("prog_dqt16", "-progressive", "-quality", "3")
Image.fromarray(px).convert("L").save(pgm)
cj("extended_grey", "-quality", "3", src=pgm)
os.remove(ppm); os.remove(pgm)
