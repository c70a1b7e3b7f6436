"""The build hook: ``models/<name>/build.py``, the one place a model is described.

Required::

    def build_model(weights: str | None, log=print) -> torch.nn.Module   # eval mode
    def example_inputs() -> torch.Tensor                                 # a batch, for export and parity

Optional::

    LABELS: list[str]                     # class names, packed as labels.json
    EXPORT_METHOD = "trace"               # trace | script | pt2 | program | onnx
    HANDLER = "image_classifier.py"       # a file in servekit/handlers/, or a path relative to the model folder
    WEIGHTS_ENV = "WEIGHTS"               # environment variable naming a weights file
    def calibration_inputs() -> list[torch.Tensor]   # int8 calibration (default: random batches)
    def warmup_sample() -> tuple[bytes, str]         # (body, content type) a new version must answer
                                                     # with 200 before it serves (packed in the archive)
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import ConfigError
from .formats import FORMATS, NAMES

# The model folders: $SERVEKIT_MODELS, else models/ in the working directory (a checkout's root).
MODELS_DIR = Path(os.environ.get("SERVEKIT_MODELS") or "models").resolve()
HANDLERS_DIR = Path(__file__).resolve().parent / "handlers"
DEFAULT_HANDLER = "image_classifier.py"


def load_build_module(model_dir: Path) -> ModuleType:
    """Import ``<model_dir>/build.py`` (as part of the ``models`` package when it lives there)."""
    build = model_dir / "build.py"
    if not build.is_file():
        raise ConfigError(f"{model_dir} has no build.py; pass --artifact with an exported model instead")
    if model_dir.resolve().parent == MODELS_DIR and (MODELS_DIR / "__init__.py").is_file():
        # As a package, so a build hook can import its folder's modules (and other models') relatively.
        if str(MODELS_DIR.parent) not in sys.path:
            sys.path.insert(0, str(MODELS_DIR.parent))
        return importlib.import_module(f"{MODELS_DIR.name}.{model_dir.name}.build")
    spec = importlib.util.spec_from_file_location(f"servekit_build_{model_dir.name}", build)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {build}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class WarmupSample:
    """A request body a healthy version answers with 200."""

    body: bytes
    content_type: str


class BuildHook:
    """A model folder's build.py, checked up front: every problem is named with what to write instead."""

    def __init__(self, model_dir: Path, module: ModuleType | None = None):
        self.model_dir = model_dir
        self.module = module or load_build_module(model_dir)
        where = f"{model_dir / 'build.py'}"
        missing = [n for n in ("build_model", "example_inputs") if not callable(getattr(self.module, n, None))]
        if missing:
            raise ConfigError(f"{where} must define {' and '.join(f'{n}()' for n in missing)} (see servekit/hooks.py)")
        method = getattr(self.module, "EXPORT_METHOD", "trace")
        if method not in FORMATS:
            raise ConfigError(f"{where}: EXPORT_METHOD must be one of {NAMES}, got {method!r}")
        self.export_method: str = method
        labels = getattr(self.module, "LABELS", None)
        if labels is not None and not (isinstance(labels, (list, tuple)) and all(isinstance(x, str) for x in labels)):
            raise ConfigError(f"{where}: LABELS must be a list of strings")
        self.labels: list[str] | None = list(labels) if labels else None
        self.weights_env: str | None = getattr(self.module, "WEIGHTS_ENV", None)
        # Built once per hook: the bench exports one model in several formats, and digits trains each time.
        self._built: dict[str | None, Any] = {}

    def build_model(self, weights: str | None, log: Callable[[str], None] = print) -> Any:
        """The eager model (with weights from ``weights`` when given): built once, a fresh copy for each caller."""
        if weights not in self._built:
            self._built[weights] = self.module.build_model(weights, log=log)
        return copy.deepcopy(self._built[weights])  # an export may change the model it is given

    def example_inputs(self) -> Any:
        """A batch of example inputs (export, parity checks)."""
        return self.module.example_inputs()

    def calibration_inputs(self) -> list | None:
        """The hook's own int8 calibration batches, if it has any."""
        fn = getattr(self.module, "calibration_inputs", None)
        return list(fn()) if callable(fn) else None

    def warmup_sample(self) -> WarmupSample | None:
        """The hook's warm-up request, if it has one."""
        fn = getattr(self.module, "warmup_sample", None)
        if not callable(fn):
            return None
        body, content_type = fn()
        if not isinstance(body, (bytes, bytearray)) or not isinstance(content_type, str) or "/" not in content_type:
            raise ConfigError(f"{self.model_dir / 'build.py'}: warmup_sample() must return (bytes, 'type/subtype')")
        return WarmupSample(bytes(body), content_type)

    def handler(self) -> Path:
        """The handler file: the hook's HANDLER (model folder, then servekit/handlers/), else the classifier."""
        name = getattr(self.module, "HANDLER", DEFAULT_HANDLER)
        for candidate in (self.model_dir / name, HANDLERS_DIR / name):
            if candidate.is_file():
                return candidate
        raise ConfigError(
            f"{self.model_dir / 'build.py'}: HANDLER {name!r} is neither in {self.model_dir} nor in {HANDLERS_DIR}"
        )

    def weights(self, given: str | None) -> str | None:
        """``given``, else the file the hook's WEIGHTS_ENV variable names (None when neither is set)."""
        return given or (os.environ.get(self.weights_env) if self.weights_env else None) or None


def default_models() -> list[str]:
    """Every model folder under models/ that has a model-config.yaml."""
    return sorted(p.parent.name for p in MODELS_DIR.glob("*/model-config.yaml"))
