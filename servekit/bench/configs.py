"""The configurations `make bench` can run, one record each: adding one is adding a row here.

A record says who serves (our handler or TorchServe's stock one), which artifact (the
TorchScript export, or one of its own), what changes in the model-config, where it may run, and
how the report shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Variant:
    """One way of running the model: precision, input memory format, frozen TorchScript or not."""

    amp: bool
    channels_last: bool
    frozen: bool
    int8: bool = False  # the int8 export (CPU): amp does not apply
    pt2: bool = False  # the AOTInductor package: precision and layout baked in at export

    def name(self, device: torch.device) -> str:
        """E.g. ``bf16+channels_last+frozen``."""
        if self.pt2:
            return "pt2 (" + ("fp16" if device.type == "cuda" and self.amp else "fp32") + ")"
        parts = ["int8" if self.int8 else ("fp16" if device.type == "cuda" else "bf16") if self.amp else "fp32"]
        parts += ["channels_last"] * self.channels_last + ["frozen"] * self.frozen
        return "+".join(parts)


@dataclass(frozen=True)
class BenchConfig:
    """One configuration of the benchmark."""

    name: str
    help: str
    ours: bool  # our handler (else TorchServe's stock image_classifier)
    color: str  # in the plot
    # An artifact of its own: the ArchiveRequest fields that make it (e.g. {"quantize": "int8"}); the
    # device is the bench's. Empty: the TorchScript export every "ours" configuration starts from.
    export: dict[str, Any] = field(default_factory=dict)
    variant: Variant | None = None  # its own model-only row, when it has its own artifact
    column: str | None = None  # its short name in the comparison table, when it is not plain "ours"
    amp: str | None = None  # "off": autocast does not apply; "baked": fixed in the artifact at export
    cpu_only: bool = False
    tuned_threads: bool = False  # stock tuned: cores / workers threads per worker, not TorchServe's default
    noop: bool = False  # TorchServe with a handler that does nothing: the floor of the server's CPU per request
    gpu_only: bool = False
    handler: dict[str, Any] = field(default_factory=dict)  # our handler's options that differ from "ours"
    # Who serves: "torchserve", or "litserve" (the peer: our pipeline inside LitServe, at our points).
    server: str = "torchserve"
    extra: str | None = None  # the optional extra (pyproject) it needs, checked before anything runs

    @property
    def our_points(self) -> bool:
        """Runs at our grid of workers, batch and delay (else at the stock grid)."""
        return self.ours or self.server != "torchserve"

    @property
    def stock_handler(self) -> bool:
        """TorchServe's own image_classifier (needs captum, threads from the stock default)."""
        return not self.ours and not self.noop and self.server == "torchserve"

    def precision(self, amp: str, device_type: str) -> str:
        """What the record says it ran in, given the model-config's amp."""
        if self.amp == "off":
            return "int8" if self.export.get("quantize") == "int8" else "off"
        if self.amp == "baked":
            return f"pt2 ({'fp16' if device_type == 'cuda' and amp == 'fp16' else 'fp32'})"
        return amp


CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in (
        BenchConfig("ours", "TorchScript export, our handler", ours=True, color="tab:blue"),
        BenchConfig(
            "ours-pt2",
            "AOTInductor .pt2 package compiled here, our handler",
            ours=True,
            color="tab:purple",
            export={"fmt": "pt2"},
            variant=Variant(amp=True, channels_last=True, frozen=True, pt2=True),
            column="pt2",
            amp="baked",
        ),
        BenchConfig(
            "ours-int8",
            "calibrated int8 export, our handler (CPU only)",
            ours=True,
            color="tab:green",
            export={"quantize": "int8"},
            variant=Variant(amp=False, channels_last=False, frozen=True, int8=True),
            column="int8",
            amp="off",
            cpu_only=True,
        ),
        BenchConfig(
            "ours-eager",
            "our handler without CUDA graphs, CUDA waits spinning (GPU only)",
            ours=True,
            color="tab:cyan",
            column="eager",
            gpu_only=True,
            handler={"cuda_graphs": False, "gpu_wait": "auto"},
        ),
        BenchConfig(
            "ours-unbuffered",
            "our handler with TorchServe's own per-field socket reads and message parser",
            ours=True,
            color="tab:olive",
            column="unbuffered",
            handler={"buffered_reads": False},
        ),
        BenchConfig(
            "ours-no-arena",
            "our handler receiving each body into memory of its own (pageable) instead of its body arena",
            ours=True,
            color="tab:gray",
            column="no arena",
            handler={"body_buffer_mib": 0},
        ),
        BenchConfig(
            "ours-tv-jpeg",
            "our handler with every JPEG decoded through torchvision, not on nvjpeg's hardware path directly (GPU)",
            ours=True,
            color="tab:green",
            column="torchvision JPEG",
            gpu_only=True,
            handler={"hardware_jpeg": False},
        ),
        BenchConfig(
            "ours-serial-decode",
            "our handler with one nvjpeg decode at a time per GPU across its workers",
            ours=True,
            color="tab:pink",
            column="serial decode",
            gpu_only=True,
            handler={"serial_gpu_decode": True},
        ),
        BenchConfig(
            "ours-one-decode-thread",
            "our handler decoding a batch's CPU images (PNG, WebP, progressive JPEG) one after another",
            ours=True,
            color="tab:pink",
            column="one decode thread",
            handler={"decode_threads": 1},
        ),
        BenchConfig(
            "ours-spin",
            "our handler with CUDA waits spinning instead of blocking (GPU only): the latency/CPU trade-off",
            ours=True,
            color="tab:brown",
            column="spin",
            gpu_only=True,
            handler={"gpu_wait": "spin"},
        ),
        BenchConfig("stock", "TorchServe's image_classifier, its default threads", ours=False, color="tab:red"),
        BenchConfig(
            "stock-tuned",
            "TorchServe's image_classifier, cores/workers threads",
            ours=False,
            color="tab:orange",
            tuned_threads=True,
        ),
        BenchConfig(
            "litserve",
            "LitServe (ZeroMQ queue) serving our decode and inference, multipart uploads (extra: litserve)",
            ours=False,
            color="tab:olive",
            server="litserve",
            extra="litserve",
        ),
        BenchConfig(
            "noop",
            "TorchServe with a handler that answers without decoding or inference (the floor)",
            ours=False,
            color="tab:gray",
            noop=True,
        ),
    )
}
OURS = tuple(n for n, c in CONFIGS.items() if c.ours)
# The baselines every "ours" family is compared against, with their column names.
BASELINES = {"stock": "stock", "stock-tuned": "stock tuned", "litserve": "litserve"}
# The configurations with an artifact of their own, by their column name in the comparison.
ALTERNATES = {n: c.column for n, c in CONFIGS.items() if c.column}
