"""In-process ceilings: the model alone on ready tensors, and image decoding alone."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from ..artifacts import load_artifact
from ..batch import Batch
from ..config import ImageOptions
from ..inference import Engine
from ..vision import Preprocessor, check_image, reference_transform
from .configs import CONFIGS, Variant

CPU_VARIANTS = tuple(Variant(a, c, f) for a in (False, True) for c in (False, True) for f in (False, True))
GPU_VARIANTS = tuple(Variant(a, c, False) for a in (False, True) for c in (False, True)) + (Variant(True, True, True),)


def rate(
    fn: Callable[[], object],
    items_per_call: int,
    seconds: float,
    sync: Callable[[], None] = lambda: None,
    warmup_calls: int = 3,
    min_calls: int = 2,
) -> float:
    """Items per second of ``fn`` over about ``seconds`` (after ``warmup_calls`` untimed calls)."""
    for _ in range(warmup_calls):
        fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < seconds:
        fn()
        sync()
        calls += 1
    return calls * items_per_call / (time.perf_counter() - t0)


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def derived_artifact(artifact: Path, out: Path, channels_last: bool = False, freeze: bool = False) -> Path:
    """A copy of a TorchScript artifact with its weights in channels_last and/or ``torch.jit.freeze``-d.

    Convolutions whose weights are channels_last run channels_last kernels even for NCHW input,
    so this reaches the faster CPU kernels without touching the handler's preprocessing.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(artifact), map_location="cpu").eval()
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        if freeze:
            module = torch.jit.freeze(module)
        module.save(str(out))
    return out


def model_ceiling(
    artifact: Path,
    frozen_artifact: Path | None,
    device: torch.device,
    opts: ImageOptions,
    batch_sizes: Sequence[int],
    variants: Sequence[Variant],
    seconds: float,
    log: Callable[[str], None] = print,
    alternates: dict[str, Path] | None = None,
) -> list[dict]:
    """Images/s of the artifact on preprocessed tensors already on ``device``, per variant and batch size.

    ``alternates`` maps bench configurations (ours-int8, ours-pt2) to their artifacts, measured too.
    """
    results = []
    paths: dict[Variant, Path] = {}
    for name, alt in (alternates or {}).items():
        own = CONFIGS[name].variant
        if own is not None:
            paths[own] = alt
    variants = [*variants, *paths]
    for variant in variants:
        chosen = paths.get(variant) or (frozen_artifact if variant.frozen else artifact)
        if chosen is None:
            continue
        try:
            results += _ceiling_variant(chosen, variant, device, opts, batch_sizes, seconds, log)
        except Exception as exc:  # one variant failing (e.g. out of memory) must not lose the others
            log(f"  model-only {variant.name(device)}: failed: {exc}")
            results.append(
                {
                    "variant": variant.name(device),
                    **asdict(variant),
                    "device": str(device),
                    "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                }
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _ceiling_variant(
    path: Path,
    variant: Variant,
    device: torch.device,
    opts: ImageOptions,
    batch_sizes: Sequence[int],
    seconds: float,
    log: Callable[[str], None],
) -> list[dict]:
    amp = ("fp16" if device.type == "cuda" else "bf16") if variant.amp else "off"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = Engine(
            load_artifact(path, device),
            replace(opts, amp=amp),
        )
    fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
    shape = (opts.channels, opts.crop, opts.crop)
    rows = []
    for bs in batch_sizes:
        x = torch.randn((bs, *shape), device=device, dtype=engine.input_dtype).contiguous(memory_format=fmt)
        ips = rate(partial(engine.forward, x), bs, seconds, _sync(device))
        rows.append(
            {
                "variant": variant.name(device),
                **asdict(variant),
                "device": str(device),
                "batch": bs,
                "threads": torch.get_num_threads() if device.type == "cpu" else None,
                "images_per_s": round(ips, 2),
            }
        )
        log(f"  model-only {variant.name(device):28s} batch {bs:4d}: {ips:9.1f} images/s")
    return rows


def decode_rates(
    raw: bytes,
    opts: ImageOptions,
    device: torch.device,
    batch_sizes: Sequence[int],
    seconds: float,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Images/s of decoding (and full preprocessing) one JPEG repeatedly: our CPU path, PIL, nvjpeg batches."""
    from PIL import Image

    cpu = torch.device("cpu")
    pre = Preprocessor(opts, cpu)
    header = check_image(raw, opts)
    pil_transform = reference_transform(opts)

    def pil_decode() -> None:
        with Image.open(io.BytesIO(raw)) as im:
            im.convert("RGB").load()

    cases: list[tuple[str, str, int, Callable[[], object], Callable[[], None]]] = [
        ("torchvision decode_image (libjpeg-turbo)", "cpu", 1, lambda: pre.decode_cpu(raw), lambda: None),
        ("PIL decode", "cpu", 1, pil_decode, lambda: None),
        (
            "servekit preprocess: decode_image + resize/crop/normalise",
            "cpu",
            1,
            lambda: pre.prepare(Batch([raw])),
            lambda: None,
        ),
        (
            "stock preprocess: PIL + torchvision transforms",
            "cpu",
            1,
            lambda: pil_transform(Image.open(io.BytesIO(raw))),
            lambda: None,
        ),
    ]
    if device.type == "cuda":
        gpu_pre = Preprocessor(opts, device)
        for bs in batch_sizes:
            raws, headers = [raw] * bs, [header] * bs
            cases.append(
                (
                    "nvjpeg batched decode_jpeg",
                    str(device),
                    bs,
                    partial(gpu_pre.decode_many, raws, headers),
                    _sync(device),
                )
            )
            cases.append(
                (
                    "servekit preprocess on GPU: nvjpeg + resize/crop/normalise",
                    str(device),
                    bs,
                    partial(gpu_pre.prepare, Batch(raws)),
                    _sync(device),
                )
            )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core rates: a worker decodes on its own share of the cores
    try:
        results = []
        for name, dev, bs, fn, sync in cases:
            row = {"path": name, "device": dev, "batch": bs, "cpu_threads": 1}
            try:
                row["images_per_s"] = round(rate(fn, bs, seconds, sync), 1)
                log(f"  decode {name:60s} [{dev}, batch {bs}]: {row['images_per_s']:8.1f} images/s")
            except Exception as exc:  # e.g. nvjpeg missing from this build: keep the other rows
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                log(f"  decode {name} [{dev}, batch {bs}]: failed: {row['error']}")
            results.append(row)
        return results
    finally:
        torch.set_num_threads(threads)
