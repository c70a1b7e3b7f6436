"""Replay a model's forward as CUDA graphs, one per batch-size bucket: one launch instead of hundreds.

A ResNet-50 forward is about 160 kernel launches; issuing them from Python through TorchScript
costs the worker more CPU than the GPU spends running them at small batches, and it is most of a
batch-1 request's latency. A captured graph replays them all with one call. Batches are padded up
to the next captured size (powers of two up to the largest warm-up size), so a handful of graphs
cover every batch TorchServe can send; a larger batch runs eagerly.

A graph may also hold what the caller does with the logits on the device (e.g. softmax and top-k):
at batch 1 those few kernels cost more to launch than to run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from .errors import first_line

log = logging.getLogger(__name__)

# What a captured function returns: the logits first (the one output the check compares), then
# whatever else was captured with them.
Outputs = tuple[torch.Tensor, ...]
Run = Callable[[torch.Tensor], Outputs]

# Replayed logits may differ from eager ones only by kernel choice (fp16 rounding), not by meaning.
MAX_REL_ERROR = 2e-2
# Eager runs per size before capture: TorchScript's profiling executor and cuDNN's autotuner settle
# in the first runs, and neither may run inside a capture.
SETTLE_RUNS = 3


def buckets(largest: int) -> list[int]:
    """Captured batch sizes: powers of two below ``largest``, then ``largest`` itself."""
    if largest < 1:
        raise ValueError(f"largest batch must be >= 1, got {largest}")
    sizes, b = [], 1
    while b < largest:
        sizes.append(b)
        b *= 2
    return [*sizes, largest]


def bucket_for(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size that holds ``n`` items (None: run eagerly)."""
    return next((b for b in sorted(sizes) if b >= n), None)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: one number for "same answer"."""
    want = want.float()
    scale = want.abs().max().clamp_min(1e-6)
    return float((got.float() - want).abs().max() / scale)


class GraphedForward:
    """``fn`` replayed from CUDA graphs: pads a batch into its bucket's static input, replays, slices."""

    def __init__(self, graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, Outputs]]):
        self.graphs = graphs
        self.sizes = sorted(graphs)

    @property
    def max_batch(self) -> int:
        """The largest batch a graph holds."""
        return self.sizes[-1]

    def input_for(self, n: int) -> torch.Tensor | None:
        """The static input rows a batch of ``n`` is replayed from (write it there to save a copy), or None."""
        size = bucket_for(n, self.sizes)
        return None if size is None else self.graphs[size][1][:n]

    def __call__(self, x: torch.Tensor, output: int = 0, to_host: bool = False) -> torch.Tensor | None:
        """Output ``output`` (0: the logits) for ``x``; None when no graph holds its batch (run it eagerly).

        ``to_host``: a copy on the CPU instead of one on the device.
        """
        n = x.shape[0]
        size = bucket_for(n, self.sizes)
        if size is None:
            return None
        graph, static_in, static_outs = self.graphs[size]
        # The static tensors were made in inference mode: they may only be written in it.
        with torch.inference_mode():
            # Rows past n keep an earlier batch's pixels: per-sample layers make them harmless, and
            # their outputs are dropped.
            rows = static_in[:n]
            if x.data_ptr() != rows.data_ptr() or x.stride() != rows.stride():
                rows.copy_(x)
            graph.replay()
            # A copy either way: the next replay overwrites the static output.
            out = static_outs[output][:n]
            return out.cpu() if to_host else out.clone()

    @classmethod
    def capture(
        cls,
        run: Run,
        sizes: Sequence[int],
        make_input: Callable[[int], torch.Tensor],
        device: torch.device,
    ) -> GraphedForward | None:
        """Capture ``run`` for each size and check one replay against eager; None (logged once) if either fails."""
        if device.type != "cuda":
            return None
        graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, Outputs]] = {}
        pool = None
        try:
            # One input buffer: each graph reads the first rows of it (replays never overlap).
            shared_in = make_input(max(sizes))
            # One side stream for every settle run and capture: cuBLAS keeps a workspace per stream
            # it has run on, so a stream per size would hold one workspace each for good.
            side = torch.cuda.Stream(device)
            for size in sorted(sizes, reverse=True):  # the largest first sizes the shared memory pool
                static_in = shared_in[:size]
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(SETTLE_RUNS):
                        run(static_in)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=side):
                    static_outs = run(static_in)
                pool = graph.pool()
                graphs[size] = (graph, static_in, static_outs)
            graphed = cls(graphs)
            error = graphed.check(run, make_input(graphed.max_batch).normal_())
        except RuntimeError as exc:
            log.warning("CUDA graphs unavailable for this model (%s); running it eagerly", first_line(exc))
            return None
        finally:
            torch.cuda.synchronize(device)
        if error > MAX_REL_ERROR:
            log.warning(
                "CUDA graph replay differs from eager by %.3g (limit %.3g); running the model eagerly",
                error,
                MAX_REL_ERROR,
            )
            return None
        return graphed

    def check(self, run: Run, x: torch.Tensor) -> float:
        """Relative error of a replay's logits against the eager forward's on ``x`` (top-k indices may
        legitimately swap near-ties, so only the logits are compared)."""
        got = self(x)
        assert got is not None
        return relative_error(got, run(x)[0])
