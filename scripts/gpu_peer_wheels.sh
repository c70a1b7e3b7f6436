#!/usr/bin/env bash
# Put the LitServe peer's wheels (servekit[litserve], pinned in requirements/dev.txt) into .gpu/ for
# the GPU host's Python (3.12 there), so `bash scripts/gpu_bench.sh peer` can run it. Only what the
# host lacks: uvicorn's reload and websocket extras are left out to stay inside the 64 MiB carry.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}
mkdir -p .gpu
pins=$("$PY" - <<'PYEOF'
import re
wanted = {"litserve", "python-multipart", "fastapi", "starlette", "pydantic", "pydantic-core", "annotated-types",
          "annotated-doc", "typing-inspection", "typing-extensions", "anyio", "idna", "uvicorn", "h11", "click",
          "httptools", "uvloop", "pyzmq", "opentelemetry-api"}
for line in open("requirements/dev.txt"):
    m = re.match(r"([A-Za-z0-9_.-]+)==([^ ;\\]+)", line)
    if m and m.group(1).lower() in wanted:
        print(f"{m.group(1)}=={m.group(2)}")
PYEOF
)
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux1_x86_64 --dest .gpu $pins
du -sh .gpu
