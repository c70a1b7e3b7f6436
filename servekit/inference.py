"""Run a loaded model: device, autocast dtype, channels_last, warm-up, top-k on the device."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .artifacts import LoadedModel
from .config import AMP_CHOICES, HandlerOptions
from .cudagraphs import GraphedForward, Outputs, buckets
from .errors import ConfigError, ModelError, OutOfMemory, first_line
from .gpuwait import set_gpu_wait

log = logging.getLogger(__name__)

AMP_DTYPES: dict[str, torch.dtype | None] = dict(zip(AMP_CHOICES, (None, torch.float16, torch.bfloat16)))


def select_device(gpu_id: int | str | None) -> torch.device:
    """The GPU TorchServe assigned, or the CPU when there is none."""
    if gpu_id is not None and str(gpu_id) != "" and torch.cuda.is_available():
        return torch.device("cuda", int(gpu_id))
    return torch.device("cpu")


def prepare_process(opts: HandlerOptions, device: torch.device, workers: int, batch_size: int) -> None:
    """Threads, the GPU wait mode and cudnn autotuning of a serving process, before it loads a model."""
    torch.set_num_threads(opts.threads(workers))
    if device.type != "cuda":
        return
    # Before set_device: it creates the CUDA context, whose wait mode is fixed from then on.
    set_gpu_wait(opts.gpu_wait, device.index or 0)
    torch.cuda.set_device(device)
    if opts.cuda_graphs and batch_size > max(opts.warmup_batch_sizes):
        log.warning(
            "batch size %d is above the largest warmup_batch_sizes entry %d: larger batches run "
            "without CUDA graphs; add %d to warmup_batch_sizes",
            batch_size,
            max(opts.warmup_batch_sizes),
            batch_size,
        )
    # Autotuning picks faster kernels per shape, at a start-up cost paid in the warm-up.
    torch.backends.cudnn.benchmark = opts.cudnn_benchmark


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``amp`` means on this device; fp16 is a GPU setting, so it is off on a CPU (bf16 is kept).

    The one rule for serving and for the export's parity check.
    """
    if amp not in AMP_DTYPES:
        raise ConfigError(f"unknown amp {amp!r}; choose one of {AMP_CHOICES}")
    dtype = AMP_DTYPES[amp]
    return None if dtype is torch.float16 and device.type == "cpu" else dtype


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is a device or host out-of-memory."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "defaultcpuallocator" in text


@dataclass
class TopK:
    """Top-k class indices and probabilities for each item of a batch."""

    indices: list[list[int]]
    probs: list[list[float]]


def topk_head(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A head for :class:`Engine`: softmax + top-k of each row, packed as one (N, 2, k) float tensor."""

    def head(logits: torch.Tensor) -> torch.Tensor:
        probs, idx = torch.softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
        # Indices travel as float32 beside the probabilities (one transfer): exact below 2**24 classes.
        return torch.stack([probs, idx.to(probs.dtype)], 1)

    return head


def unpack_topk(packed: torch.Tensor) -> TopK:
    """A :func:`topk_head` output as lists, brought to the host in one transfer if it is not there yet."""
    # Python lists at once: at batch 1, each torch call on the small CPU tensor costs more than the lists.
    rows = packed.cpu().tolist()
    return TopK(indices=[list(map(int, row[1])) for row in rows], probs=[row[0] for row in rows])


class Engine:
    """A model on its device with its dtype, ready for batches.

    ``head``: a step on the logits that stays on the device (e.g. :func:`topk_head`); :meth:`infer`
    returns its output, and on a GPU it is captured in the same graphs as the forward.
    """

    def __init__(
        self, model: LoadedModel, opts: HandlerOptions, head: Callable[[torch.Tensor], torch.Tensor] | None = None
    ):
        self.model = model
        self.opts = opts
        self.device = model.device
        self.amp = amp_dtype(opts.amp, self.device) if model.autocast else None
        if opts.amp == "fp16" and self.device.type == "cpu":
            log.info("amp fp16 applies on GPUs only; running fp32 on the CPU")
        # The dtype the preprocessor should produce for the model's input: on a GPU under fp16/bf16
        # autocast the first layer would cast a float32 batch to it anyway, so make it in that dtype
        # (half the bytes to write, copy and hold).
        gpu_amp = self.amp if self.device.type == "cuda" else None
        self.input_dtype = model.input_dtype or gpu_amp or torch.float32
        self.graphs: GraphedForward | None = None
        self.head = head

    def _autocast(self, cache: bool = True):
        if self.amp is None:
            return contextlib.nullcontext()
        # A capture must not cache casts: the cache would live outside the graph's memory.
        return torch.autocast(device_type=self.device.type, dtype=self.amp, cache_enabled=cache)

    def _eager(self, batch: torch.Tensor, cache: bool = True) -> torch.Tensor:
        with torch.inference_mode(), self._autocast(cache):
            return self.model(batch)

    def _captured(self, batch: torch.Tensor) -> Outputs:
        """What a graph holds: the logits, and the head's output when there is a head."""
        logits = self._eager(batch, cache=False)
        return (logits,) if self.head is None else (logits, self.head(logits))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for a preprocessed batch; out-of-memory becomes :class:`OutOfMemory` (507)."""
        return self._run(batch, with_head=False)

    def infer(self, batch: torch.Tensor, to_host: bool = False) -> torch.Tensor:
        """The head's output for a preprocessed batch (the logits without a head); ``to_host``: on the CPU."""
        return self._run(batch, with_head=True, to_host=to_host)

    def input_buffer(self, n: int) -> torch.Tensor | None:
        """Where a batch of ``n`` may be preprocessed into so that a graph replays it without a copy, or None."""
        return self.graphs.input_for(n) if self.graphs is not None else None

    def _run(self, batch: torch.Tensor, with_head: bool, to_host: bool = False) -> torch.Tensor:
        head = self.head if with_head else None
        try:
            out = self.graphs(batch, int(head is not None), to_host) if self.graphs is not None else None
            if out is None:
                out = self._eager(batch)
                if head is not None:
                    with torch.inference_mode():
                        out = head(out)
                if to_host:
                    out = out.cpu()
            return out
        except Exception as exc:
            if is_oom(exc):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise OutOfMemory(
                    f"out of memory running a batch of {batch.shape[0]} on {self.device}; retry, or lower batchSize"
                ) from None
            raise ModelError(f"model failed: {first_line(exc)}") from None

    def topk(self, logits: torch.Tensor, k: int) -> TopK:
        """Softmax + top-k on the device, then one transfer to the host."""
        with torch.inference_mode():
            return unpack_topk(topk_head(k)(logits))

    def warmup(
        self,
        batch_sizes: Sequence[int],
        sample_shape: tuple[int, ...],
        memory_format: torch.memory_format,
    ) -> None:
        """Run each batch size once (with the head) so the first request pays no compile or allocation.

        On a GPU with ``cuda_graphs``, then capture the forward, and the head with it, for batch sizes
        up to the largest one.
        """

        def sample(bs: int) -> torch.Tensor:
            x = torch.zeros((bs, *sample_shape), device=self.device, dtype=self.input_dtype)
            return x.contiguous(memory_format=memory_format)

        for bs in batch_sizes:
            self.infer(sample(bs))
        if self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        if self.opts.cuda_graphs and self.model.graphable:
            eager_mib = torch.cuda.memory_reserved(self.device) / 2**20
            with torch.inference_mode():
                self.graphs = GraphedForward.capture(self._captured, buckets(max(batch_sizes)), sample, self.device)
            if self.graphs is not None:
                # The eager warm-up's cached blocks: the graphs have their own pool now.
                torch.cuda.empty_cache()
                log.info(
                    "CUDA graphs captured for batch sizes %s; memory reserved %.0f MiB (eager warm-up: %.0f MiB)",
                    self.graphs.sizes,
                    torch.cuda.memory_reserved(self.device) / 2**20,
                    eager_mib,
                )
