"""Batched JPEG decode on the GPU: torchvision (nvjpeg) against nvImageCodec, 1 and 4 processes at once."""
import json, multiprocessing as mp, os, resource, sys, time
import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
sys.path.insert(0, os.getcwd())
from servekit.bench.images import synthetic_jpeg
from servekit.gpuwait import set_gpu_wait

B = 32

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime

def bodies():
    jpeg = synthetic_jpeg()
    arena = torch.empty(len(jpeg) * B, dtype=torch.uint8, pin_memory=True)
    a = arena.numpy()
    out = []
    for i in range(B):
        a[i*len(jpeg):(i+1)*len(jpeg)] = np.frombuffer(jpeg, np.uint8)
        out.append(memoryview(a)[i*len(jpeg):(i+1)*len(jpeg)])
    return arena, out

def make(kind, views):
    dev = torch.device("cuda", 0)
    if kind == "torchvision":
        datas = [torch.frombuffer(v, dtype=torch.uint8) for v in views]
        return lambda: decode_jpeg(datas, mode=ImageReadMode.RGB, device=dev)
    if kind == "servekit":
        from servekit.nvjpeg import HardwareJpegDecoder
        from servekit.imageheader import jpeg_frame
        datas = [torch.frombuffer(v, dtype=torch.uint8) for v in views]
        dec = HardwareJpegDecoder(dev, 3)
        def run():
            frames = [jpeg_frame(v) for v in views]
            ok = [dec.takes(d, f.hardware_header) for d, f in zip(datas, frames)]
            assert all(ok)
            return dec.decode(datas, [f[:2] for f in frames])
        return run
    from nvidia import nvimgcodec
    backends = {"nvimgcodec-hw": [nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY), nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)],
                "nvimgcodec-gpu": [nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)]}[kind]
    dec = nvimgcodec.Decoder(device_id=0, backends=backends)
    arrs = [np.frombuffer(v, np.uint8) for v in views]
    params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.RGB, apply_exif_orientation=False)
    stream = torch.cuda.current_stream().cuda_stream
    def run():
        imgs = dec.decode(arrs, params=params, cuda_stream=stream)
        return [torch.as_tensor(im, device="cuda") for im in imgs]
    return run

def worker(args):
    kind, calls, start_at, wait = args
    set_gpu_wait(wait, 0)
    arena, views = bodies()
    fn = make(kind, views)
    for _ in range(5): fn()
    torch.cuda.synchronize()
    time.sleep(max(0, start_at - time.time()))
    c0, t0 = cpu(), time.perf_counter()
    for _ in range(calls):
        fn(); torch.cuda.synchronize()
    n = calls * B
    return {"cpu_us": round((cpu() - c0) / n * 1e6, 1), "wall_us": round((time.perf_counter() - t0) / n * 1e6, 1), "pid": os.getpid()}

def parity():
    arena, views = bodies()
    a = make("torchvision", views)()[0]
    out = {"torchvision_shape": list(a.shape)}
    for k in ("servekit",):
        try:
            b = make(k, views)()[0]
            out[k] = {"shape": list(b.shape), "max_abs_diff": int((a.int() - b.int()).abs().max())}
        except Exception as e:
            out[k] = {"error": repr(e)[:300]}
    return out

def loop(kind, seconds):
    set_gpu_wait("blocking", 0)
    arena, views = bodies()
    fn = make(kind, views)
    end = time.time() + seconds
    while time.time() < end:
        fn(); torch.cuda.synchronize()

if __name__ == "__main__" and sys.argv[1:2] == ["loop"]:
    loop(sys.argv[2], float(sys.argv[3])); sys.exit(0)

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    res = {"cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["parity"] = parity(); print(json.dumps(res["parity"]), flush=True)
    calls = int(os.environ.get("CALLS", "150"))
    for rep in (1, 2):
        for kind in ("torchvision", "servekit"):
            for procs in (1, 4):
                for wait in ("blocking",):
                    with ctx.Pool(procs) as pool:
                        start = time.time() + 4
                        rows = pool.map(worker, [(kind, calls, start, wait)] * procs)
                    imgs = procs * calls * B / max(r["wall_us"] * calls * B / 1e6 for r in rows)
                    key = f"{kind} p{procs} {wait} #{rep}"
                    res[key] = {"per_process": rows, "images_per_s_all": round(imgs)}
                    print(key, json.dumps(res[key]), flush=True)
    json.dump(res, open(os.environ.get("OUT", ".") + "/decode_ab.json", "w"), indent=1)
