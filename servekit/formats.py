"""The artifact formats, one record each: what ``--format`` takes, what the file is called, how it is made
and loaded, what travels beside it. Adding a format is a record here, its exporter in
``servekit.export.EXPORTERS`` and, for a new kind of file, its loader in ``servekit.artifacts.LOADERS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Loader kinds (keys of servekit.artifacts.LOADERS).
TORCHSCRIPT, AOTI, EXPORTED, ONNX = "torchscript", "aoti", "exported_program", "onnx"
# The suffixes a TorchScript file comes with (what the loader accepts; an export writes .pt).
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")


@dataclass(frozen=True)
class Format:
    """One artifact format."""

    name: str  # what --format and EXPORT_METHOD take
    suffix: str  # the file an export writes
    exporter: str  # its key in servekit.export.EXPORTERS
    loaders: tuple[str, ...]  # the loader kinds its files may need
    side_files: tuple[str, ...] = ()  # suffixes of files written beside it that travel with it
    traced: bool = False  # records one path through the model: data-dependent branches are lost
    device_specific: bool = False  # compiled for the device it was exported on

    @property
    def suffixes(self) -> tuple[str, ...]:
        """The suffixes its files may have."""
        return TORCHSCRIPT_SUFFIXES if TORCHSCRIPT in self.loaders else (self.suffix,)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("trace", ".pt", "torchscript", (TORCHSCRIPT,), traced=True),
        Format("script", ".pt", "torchscript", (TORCHSCRIPT,)),
        # The AOTInductor package's input dtype is baked in; the .dtype file says which (and the loader checks it).
        Format("pt2", ".pt2", "pt2", (AOTI, EXPORTED), side_files=(".dtype",), device_specific=True),
        # The torch.export program itself, not compiled: any device, autocast at run time.
        Format("program", ".pt2", "program", (AOTI, EXPORTED)),
        Format("onnx", ".onnx", "onnx", (ONNX,), traced=True),
    )
}
NAMES = tuple(FORMATS)


def loaders_for(path: Path) -> tuple[str, ...]:
    """The loader kinds a file may need, from its suffix (empty when no format has it)."""
    suffix = path.suffix.lower()
    for fmt in FORMATS.values():
        if suffix in fmt.suffixes:
            return fmt.loaders
    return ()


def side_files(artifact: Path) -> list[Path]:
    """The files beside ``artifact`` that belong to it (e.g. ``model.pt2.dtype``), those that exist."""
    suffixes = {s for f in FORMATS.values() if artifact.suffix.lower() in f.suffixes for s in f.side_files}
    return [p for p in (artifact.with_name(artifact.name + s) for s in sorted(suffixes)) if p.is_file()]
