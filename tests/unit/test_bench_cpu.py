"""The bench's split of server CPU between TorchServe's frontend and its Python workers."""

from __future__ import annotations

import pytest

from servekit.bench.procs import process_role
from servekit.bench.pyspy import top_table
from servekit.bench.report import cpu_split


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        (
            ["/usr/lib/jvm/java-17-openjdk-amd64/bin/java", "-Dmodel_server_home=/x", "org.pytorch.serve.ModelServer"],
            "frontend",
        ),
        (["/opt/venv/bin/python", "/opt/venv/lib/python3.11/site-packages/ts/model_service_worker.py"], "workers"),
        (["/opt/venv/bin/python", "-m", "ts.model_server", "--start", "--foreground"], "other"),
        ([], "other"),
    ],
)
def test_process_role(cmdline, role):
    assert process_role(cmdline) == role


def test_cpu_split_per_request():
    split = cpu_split(rps=4000.0, server=5.0, frontend=2.0, workers=2.8)
    assert split["frontend_ms_per_request"] == 0.5 and split["workers_ms_per_request"] == 0.7
    assert split["server_ms_per_request"] == 1.25 and split["requests_per_server_cpu_s"] == 800.0
    idle = cpu_split(rps=0.0, server=0.0, frontend=None, workers=0.1)
    assert idle["frontend_ms_per_request"] is None and idle["requests_per_server_cpu_s"] is None


def test_py_spy_top_table_counts_own_and_inclusive_samples_per_function():
    collapsed = "\n".join(
        [
            "main (w.py:10);handle (h.py:5);decode (v.py:7) 6",
            "main (w.py:10);handle (h.py:6);infer (i.py:3) 3",  # another line of handle: the same function
            "main (w.py:11) 1",
            "garbage",
        ]
    )
    table = top_table(collapsed, n=2)
    assert table.startswith("10 samples")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == ["| 60.0% | 60.0% | `decode (v.py)` |", "| 30.0% | 30.0% | `infer (i.py)` |"]
    assert "| 0.0% |" not in top_table(collapsed) and "`handle (h.py)`" not in table
    assert "| 10.0% | 100.0% | `main (w.py)` |" in top_table(collapsed)
