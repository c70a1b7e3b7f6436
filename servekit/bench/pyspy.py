"""``--py-spy``: sample one worker with py-spy during the peak window; a flame graph and a top-20 table."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

Log = Callable[[str], None]
LINE = re.compile(r":\d+\)$")


class Profiler:
    """py-spy on two workers for one measured window: an SVG flame graph of one, raw stacks of the other.

    Non-blocking sampling (the worker is never paused), so the window's figures stay comparable.
    Without py-spy on PATH it says so once and records nothing.
    """

    def __init__(self, out: Path, log: Log):
        self.out, self.log = out, log
        self.exe = shutil.which("py-spy")
        self.procs: list[subprocess.Popen] = []
        self.raw: Path | None = None
        if self.exe is None:
            log("--py-spy: py-spy is not on PATH (pip install py-spy); no profile is recorded")

    def start(self, pids: list[int], seconds: float, label: str) -> None:
        """Start sampling (returns at once); ``label`` names the files."""
        if self.exe is None or not pids:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        base = ["--duration", str(max(1, round(seconds))), "--rate", "200", "--nonblocking"]
        svg, self.raw = self.out / f"{label}.svg", self.out / f"{label}.stacks.txt"
        for pid, fmt, path in ((pids[0], "flamegraph", svg), (pids[-1], "raw", self.raw)):
            cmd = [self.exe, "record", "--pid", str(pid), "--format", fmt, "-o", str(path), *base]
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    def finish(self) -> str | None:
        """Wait for py-spy; the top-20 table of the raw stacks (markdown), or None."""
        errors = []
        for proc in self.procs:
            _, err = proc.communicate(timeout=120)
            if proc.returncode:
                errors.append(err.decode(errors="replace").strip().splitlines()[-1:] or ["?"])
        self.procs = []
        if errors:
            self.log(f"--py-spy failed: {errors[0][0]}")
        if self.raw is None or not self.raw.is_file():
            return None
        table = top_table(self.raw.read_text())
        self.raw.with_suffix(".md").write_text(table)
        return table


def top_table(collapsed: str, n: int = 20) -> str:
    """The ``n`` functions with the most samples of their own, from py-spy's raw (collapsed) stacks."""
    own: Counter[str] = Counter()
    within: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [LINE.sub(")", f) for f in stack.split(";")]  # a function, not one of its lines
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            within[frame] += samples
    rows = (
        [f"| {100 * c / total:.1f}% | {100 * within[f] / total:.1f}% | `{f}` |" for f, c in own.most_common(n)]
        if total
        else []
    )
    head = f"{total} samples\n\n| own | with callees | function (file) |\n|---|---|---|\n"
    return head + "\n".join(rows) + "\n"
