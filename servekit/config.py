"""Per-model configuration (``models/<name>/model-config.yaml``), checked up front."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

# Set by `servekit serve` for TorchServe's workers: the worker count of a model whose config sets none.
WORKERS_ENV = "SERVEKIT_DEFAULT_WORKERS"
# Autocast dtypes by name; the one list every module takes them from.
AMP_CHOICES = ("off", "fp16", "bf16")
DECODE_CHOICES = ("auto", "cpu", "cuda")
# How a worker waits for its GPU (servekit.gpuwait): "auto" leaves it to the driver.
GPU_WAIT_CHOICES = ("blocking", "spin", "yield", "auto")
# TorchServe's own keys at the top level of model-config.yaml that we check.
TS_INT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
_TUPLES = ("mean", "std", "warmup_batch_sizes")
OptionsT = TypeVar("OptionsT", bound="HandlerOptions")


# What a value of each plain option type must be (bool is an int to Python, so it is told apart).
_KINDS: dict[str, tuple[str, Any]] = {
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
}


def _wrong_types(cls: type, data: dict[str, Any]) -> list[str]:
    """A line for each value whose type its option does not take (so no check below meets a wrong type)."""
    wrong = []
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name in _TUPLES:
            if not isinstance(value, list | tuple) or not all(_KINDS["float"][1](v) for v in value):
                wrong.append(f"{f.name} must be a list of numbers, got {value!r}")
        elif str(f.type) in _KINDS and not _KINDS[str(f.type)][1](value):
            wrong.append(f"{f.name} must be {_KINDS[str(f.type)][0]}, got {value!r}")
    return wrong


@dataclass(frozen=True)
class HandlerOptions:
    """The ``handler:`` options every handler takes; a handler declares its own in a subclass.

    A subclass adds fields and extends :meth:`problems`; unknown keys and bad values fail at load
    with the list of valid keys of the handler's own class.
    """

    version: str = "1.0"
    amp: str = "off"
    channels_last: bool = True
    warmup_batch_sizes: tuple[int, ...] = (1,)
    cpu_threads: int | str = "auto"
    cudnn_benchmark: bool = True
    # GPU only: replay the forward from CUDA graphs captured at load (servekit.cudagraphs).
    cuda_graphs: bool = True
    gpu_wait: str = "blocking"
    # Read the frontend's messages through a buffer (handlers/frontend_reader.py) instead of a recv per field.
    buffered_reads: bool = True
    # With buffered_reads: MiB per worker that a batch's bodies are received into, reused batch after
    # batch and page-locked on a GPU (nvjpeg then copies them to the GPU without a staging copy);
    # a body that does not fit gets memory of its own. 0: every body its own memory.
    body_buffer_mib: int = 16

    def problems(self) -> list[str]:
        """What is wrong with these values (empty: nothing)."""
        problems = []
        if self.amp not in AMP_CHOICES:
            problems.append(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if not self.warmup_batch_sizes or any(b < 1 for b in self.warmup_batch_sizes):
            problems.append("warmup_batch_sizes must list batch sizes >= 1")
        if self.cpu_threads != "auto" and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            problems.append(f"cpu_threads must be 'auto' or an integer >= 1, got {self.cpu_threads!r}")
        if self.gpu_wait not in GPU_WAIT_CHOICES:
            problems.append(f"gpu_wait must be one of {GPU_WAIT_CHOICES}, got {self.gpu_wait!r}")
        if type(self.body_buffer_mib) is not int or not 0 <= self.body_buffer_mib <= 1024:
            problems.append(f"body_buffer_mib must be an integer from 0 to 1024, got {self.body_buffer_mib!r}")
        return problems

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid handler options: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> HandlerOptions:
        """Build from the ``handler:`` mapping; unknown keys are an error, with the known ones named."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown handler option(s) {unknown}; known options: {sorted(known)}")
        if "amp" in data and data["amp"] in (False, None):
            data["amp"] = "off"  # YAML reads a bare `off` as False
        if "version" in data:
            data["version"] = str(data["version"])
        wrong = _wrong_types(cls, data)
        if wrong:
            raise ConfigError("invalid handler options: " + "; ".join(wrong))
        for key in _TUPLES:
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def threads(self, workers: int, cpus: int | None = None) -> int:
        """Torch threads for one worker: explicit, or the machine's cores split across workers."""
        if self.cpu_threads != "auto":
            return int(self.cpu_threads)
        cpus = cpus or available_cpus()
        return max(1, cpus // max(1, workers))


@dataclass(frozen=True)
class ImageOptions(HandlerOptions):
    """Options of handlers that take JPEG, PNG or WebP images: decoding limits and preprocessing."""

    decode_device: str = "auto"
    # GPU only: the workers on one GPU run nvjpeg's batched decode one at a time (servekit.gpulock).
    serial_gpu_decode: bool = False
    # GPU only: baseline JPEGs go to nvjpeg's hardware decoder straight from servekit's header
    # check, skipping torchvision's second parse of each image (servekit.nvjpeg).
    hardware_jpeg: bool = True
    # Threads that decode a batch's images on the CPU side by side (PNG, WebP, progressive JPEG; every
    # image on a CPU worker). auto: the worker's torch threads (cpu_threads); 1: one after another.
    decode_threads: int | str = "auto"
    channels: int = 3
    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 8 * 1024 * 1024
    # Long side over short side. The resize to ``resize`` on the short side grows with it: a 20000x1
    # PNG of a few hundred bytes would be resized to 256x5,120,000 (15 GB of memory, 21 s of a core).
    max_aspect_ratio: float = 25.0
    # Turn a JPEG upright as its EXIF orientation says, as browsers and PIL's exif_transpose do (phones
    # store portrait photos on their side with orientation 6). false: the pixels as stored, for a model
    # trained on them so.
    exif_orientation: bool = True

    def problems(self) -> list[str]:
        """What is wrong with these values (empty: nothing)."""
        problems = super().problems()
        if self.decode_device not in DECODE_CHOICES:
            problems.append(f"decode_device must be one of {DECODE_CHOICES}, got {self.decode_device!r}")
        if self.decode_threads != "auto" and (type(self.decode_threads) is not int or self.decode_threads < 1):
            problems.append(f"decode_threads must be 'auto' or an integer >= 1, got {self.decode_threads!r}")
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, got {self.channels!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            problems.append(f"mean and std need {self.channels} values each")
        if any(s <= 0 for s in self.std):
            problems.append("std values must be > 0")
        if not (0 < self.crop <= self.resize):
            problems.append(f"need 0 < crop <= resize, got crop={self.crop}, resize={self.resize}")
        if self.max_image_pixels < 1 or self.max_image_bytes < 1:
            problems.append("max_image_pixels and max_image_bytes must be >= 1")
        if not self.max_aspect_ratio >= 1:
            problems.append(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio!r}")
        return problems


@dataclass(frozen=True)
class ClassifierOptions(ImageOptions):
    """Options of the image classifier: how many classes to return, and their names."""

    topk: int = 5
    labels: str | None = "labels.json"

    def problems(self) -> list[str]:
        """What is wrong with these values (empty: nothing)."""
        problems = super().problems()
        if self.topk < 1:
            problems.append(f"topk must be >= 1, got {self.topk}")
        return problems


@dataclass(frozen=True)
class ModelConfig:
    """A whole model-config.yaml: TorchServe's keys plus our handler options."""

    raw: dict[str, Any] = field(default_factory=dict)
    handler: HandlerOptions = field(default_factory=ClassifierOptions)

    @property
    def batch_size(self) -> int:
        """TorchServe's batchSize (1 when unset)."""
        return int(self.raw.get("batchSize", 1))

    @property
    def max_workers(self) -> int:
        """TorchServe's maxWorkers; when the model-config sets no count, the server's default (servekit.tuning)."""
        if "maxWorkers" in self.raw or "minWorkers" in self.raw:
            return int(self.raw.get("maxWorkers", self.raw.get("minWorkers", 1)))
        return max(1, int(os.environ.get(WORKERS_ENV, "1") or 1))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, options: type[HandlerOptions] = ClassifierOptions) -> ModelConfig:
        """Check TorchServe's integer keys and parse the handler section with the handler's ``options`` class."""
        data = dict(data or {})
        bad = [k for k in TS_INT_KEYS if k in data and not isinstance(data[k], int)]
        if bad:
            raise ConfigError(f"model-config keys {bad} must be integers")
        if data.get("minWorkers", 1) > data.get("maxWorkers", data.get("minWorkers", 1)):
            raise ConfigError("minWorkers must not exceed maxWorkers")
        if data.get("maxBatchDelay") == 0 and data.get("batchSize", 1) > 1:
            # Model.pollBatch stops collecting once the delay left is <= 0, and an archive's 0 reads as unset.
            raise ConfigError(
                "maxBatchDelay 0 does not batch: TorchServe 0.12 reads it from an archive as 100 ms, and where it "
                "takes 0 it sends batches of at most 2 (docs/performance.md); use 1 or more"
            )
        return cls(raw=data, handler=options.from_dict(data.get("handler")))

    @classmethod
    def load(cls, path: str | os.PathLike, options: type[HandlerOptions] = ClassifierOptions) -> ModelConfig:
        """Read and check a model-config.yaml file (the handler section with ``options``)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(data, options)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.message}") from exc

    def options(self, cls: type[OptionsT]) -> OptionsT:
        """The handler options as ``cls`` (what a caller that needs a handler's own options asks for)."""
        if not isinstance(self.handler, cls):
            raise ConfigError(f"these are {type(self.handler).__name__} options, not {cls.__name__}")
        return self.handler

    def with_version(self, version: str) -> ModelConfig:
        """A copy whose handler section carries ``version``."""
        raw = dict(self.raw)
        raw["handler"] = {**(raw.get("handler") or {}), "version": str(version)}
        return ModelConfig.from_dict(raw, type(self.handler))

    def dump(self) -> str:
        """YAML text for the archive."""
        return yaml.safe_dump(self.raw, sort_keys=False)


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def read_properties(path: str | os.PathLike) -> dict[str, str]:
    """Parse a Java-style ``key=value`` properties file (comments and blanks skipped)."""
    props: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        props[key.strip()] = value.strip()
    return props


def write_properties(props: dict[str, str], path: str | os.PathLike) -> None:
    """Write ``key=value`` lines."""
    Path(path).write_text("".join(f"{k}={v}\n" for k, v in props.items()))
