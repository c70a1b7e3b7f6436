#!/usr/bin/env bash
# Write requirements/*.txt: every package of each install target pinned with its sha256 hashes.
# uv (`uv pip compile`) rather than pip-tools: it resolves for stated targets whatever the host
# runs (dev and local: every Python >= 3.11 on any OS, in one file with markers; the images: Python
# 3.11 on manylinux x86_64, what their Debian base runs), and it takes the hashes
# from the index's simple API, where pip-compile downloads every candidate file (every platform's
# torch wheel) to hash it whenever PyPI's JSON API is not reachable, as behind a registry proxy.
# The output is a plain requirements file: the installs (Makefile, CI, images) need only pip.
#
#   dev.txt        make dev / make test / CI: everything (servekit[dev])
#   local.txt      make install / make serve / make bench: servekit[cpu,archive,bench,litserve,java]
#   build.txt      the build backend (pyproject's build-system.requires), for --no-build-isolation
#   torch.txt      the torch + torchvision pair from PyPI (a CUDA 13 build) and its dependencies
#   image-cpu.txt  the runtime image without the torch pair: servekit's dependencies + onnxruntime
#   image-gpu.txt  the same with onnxruntime-gpu
# The images install the torch pair from TORCH_INDEX_URL (docker/build.sh): torch.txt when that is
# PyPI, else that index's own build of the same versions.
# Run with `make lock` after changing a pin in pyproject.toml, and commit the result.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
UV=${UV:-.venv/bin/uv}
PY=${PY:-.venv/bin/python}
IMAGE_TARGET=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
mkdir -p requirements build/lock

# The inputs come from pyproject.toml, so that a pin lives in one place.
"$PY" - <<'PYEOF'
import tomllib
toml = tomllib.load(open("pyproject.toml", "rb"))
project = toml["project"]
pair = ("torch==", "torchvision==")
deps = project["dependencies"]
extras = project["optional-dependencies"]
rest = [d for d in deps if not d.startswith(pair)]
lines = lambda reqs: "\n".join(reqs) + "\n"  # noqa: E731
# The pair shares numpy, pillow, filelock ... with servekit: hold those at servekit's own pins.
open("build/lock/pins.txt", "w").write(lines(rest))
open("build/lock/torch.in", "w").write(lines([d for d in deps if d.startswith(pair)]))
open("build/lock/build.in", "w").write(lines(toml["build-system"]["requires"]))
for variant in ("cpu", "gpu"):
    open(f"build/lock/image-{variant}.in", "w").write(lines(rest + extras[variant]))
PYEOF

compile() {
  local out=$1
  shift
  echo "lock: $out" >&2
  "$UV" pip compile --quiet --generate-hashes --custom-compile-command "make lock" --output-file "$out" "$@"
}

compile requirements/dev.txt --universal --extra dev pyproject.toml
compile requirements/local.txt --universal --extra cpu --extra archive --extra bench --extra litserve --extra java pyproject.toml
compile requirements/build.txt --universal build/lock/build.in
compile requirements/torch.txt "${IMAGE_TARGET[@]}" --no-strip-markers --constraint build/lock/pins.txt build/lock/torch.in
compile requirements/image-cpu.txt "${IMAGE_TARGET[@]}" --no-strip-markers build/lock/image-cpu.in
compile requirements/image-gpu.txt "${IMAGE_TARGET[@]}" --no-strip-markers build/lock/image-gpu.in
