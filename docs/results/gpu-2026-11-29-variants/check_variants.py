"""JPEG variants on the GPU: torchvision's own GPU decode (alone, in a batch) and ours, against libjpeg on the CPU."""
import json, os, sys, time
import torch
sys.path.insert(0, os.getcwd())
from torchvision.io import ImageReadMode, decode_jpeg
from servekit.config import ImageOptions
from servekit.errors import RequestError
from servekit.vision import Preprocessor, check_image, as_uint8
folder, out = sys.argv[1], sys.argv[2]
dev = torch.device("cuda", 0)
names = sorted(f for f in os.listdir(folder) if f.endswith(".jpg"))
raws = {n: open(os.path.join(folder, n), "rb").read() for n in names}
def diff(a, b):
    if a.shape != b.shape: return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    d = (a.cpu().int() - b.cpu().int()).abs()
    return f"max {int(d.max())} mean {float(d.float().mean()):.3f}"
def err(e): return f"{type(e).__name__}: {str(e).strip().splitlines()[0][-160:]}"
report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
for chans in (3, 1):
    mode = ImageReadMode.RGB if chans == 3 else ImageReadMode.GRAY
    opts = ImageOptions(channels=chans, mean=(0.5,) * chans, std=(0.5,) * chans)
    cpu, gpu = Preprocessor(opts, torch.device("cpu")), Preprocessor(opts, dev)
    gpu.warmup()
    base, prog = raws["baseline420.jpg"], raws["progressive.jpg"]
    rows = {}
    for n in names:
        raw, row = raws[n], {}
        try:
            ref = cpu.decode_cpu(raw)
        except RequestError as e:
            ref = None; row["cpu"] = err(e)
        try:
            tv = decode_jpeg(as_uint8(bytearray(raw)), mode=mode, device=dev); torch.cuda.synchronize()
            row["torchvision_gpu_alone"] = diff(tv, ref) if ref is not None else f"decoded {tuple(tv.shape)}"
        except Exception as e:
            row["torchvision_gpu_alone"] = err(e)
        try:
            tvb = decode_jpeg([as_uint8(bytearray(x)) for x in (base, raw, prog)], mode=mode, device=dev); torch.cuda.synchronize()
            row["torchvision_gpu_batch"] = diff(tvb[1], ref) if ref is not None else "decoded"
        except Exception as e:
            row["torchvision_gpu_batch"] = err(e)
        try:
            h = check_image(raw, opts); row["route"] = "hardware" if h.hardware_header else ("cpu" if h.cpu_only else "torchvision-gpu")
            if h.hardware_header and gpu.hardware is not None:
                row["engine_takes"] = bool(gpu.hardware.takes(as_uint8(bytearray(raw)), h.hardware_header))
            bh, ph = check_image(base, opts), check_image(prog, opts)
            ours = gpu.decode_many([bytearray(raw)], [h])[0]
            mixed = gpu.decode_many([bytearray(x) for x in (base, raw, prog, base)], [bh, h, ph, bh])
            torch.cuda.synchronize()
            row["ours_alone"] = diff(ours, ref) if isinstance(ours, torch.Tensor) else err(ours)
            row["ours_batch"] = diff(mixed[1], ref) if isinstance(mixed[1], torch.Tensor) else err(mixed[1])
            row["mates"] = [diff(m, cpu.decode_cpu(x)) for m, x in zip((mixed[0], mixed[2], mixed[3]), (base, prog, base))]
        except RequestError as e:
            row["header"] = err(e)
        rows[n] = row
        print(chans, n, json.dumps(row), flush=True)
    report[f"channels{chans}"] = rows
if "arith.jpg" not in raws:
    json.dump(report, open(os.path.join(out, "jpeg_variants.json"), "w"), indent=1); sys.exit(0)
# What one arithmetic-coded JPEG costs a batch of 32 on torchvision's GPU path (before: not cpu_only).
opts = ImageOptions()
gpu = Preprocessor(opts, dev); gpu.warmup()
prog = raws["progressive.jpg"]; ph = check_image(prog, opts)
def timed(raws_, hs):
    for _ in range(3): gpu.decode_many(raws_, hs)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): gpu.decode_many(raws_, hs)
    torch.cuda.synchronize(); return (time.perf_counter() - t) / 10 * 1e3
ar = raws["arith.jpg"]; ah = check_image(ar, opts)
report["batch32_progressive_ms"] = timed([bytearray(prog)] * 32, [ph] * 32)
report["batch31_progressive_plus_arith_ms"] = timed([bytearray(prog)] * 31 + [bytearray(ar)], [ph] * 31 + [ah])
report["batch31_progressive_plus_arith_old_route_ms"] = timed([bytearray(prog)] * 31 + [bytearray(ar)], [ph] * 31 + [ah._replace(cpu_only=False) if hasattr(ah, "_replace") else type(ah)(ah.format, ah.width, ah.height, 0, False)])
print({k: v for k, v in report.items() if k.endswith("_ms")})
json.dump(report, open(os.path.join(out, "jpeg_variants.json"), "w"), indent=1)
