#!/usr/bin/env bash
# Build the servekit image, tagged servekit:$VARIANT (or $IMAGE).
#   1. wheelhouse: `pip download` what requirements/*.txt lock (hashes checked) into build/wheels/
#      on the host; docker/requirements.py writes the two files the image installs;
#   2. `podman build` (or `docker build` when podman is not installed) of docker/Dockerfile
#      with the repository root as context; the Dockerfile installs from build/wheels/ only.
# Environment:
#   VARIANT          gpu | cpu (default gpu)
#   TORCH_INDEX_URL  where the torch + torchvision pair comes from. Default: PyTorch's CPU index
#                    for cpu (no CUDA libraries: a far smaller image), its CUDA 13 index for gpu.
#                    `pypi` (or PyPI's URL): PyPI's CUDA 13 build, hash-checked against
#                    requirements/torch.txt; what CI uses, as PyPI is what it can reach. From any
#                    other index the versions are the lock's and the hashes are those of the files
#                    downloaded (written into the image's /opt/servekit/torch-requirements.txt).
#   BASE_IMAGE       base of both stages (default: debian:bookworm-slim; CI passes
#                    localhost/debian-base:bookworm, made by docker/podman-setup.sh). Its python
#                    must be 3.11, the python the locks are written for.
#   IMAGE            tag (default servekit:$VARIANT)
#   ENGINE           podman | docker (default: podman when installed)
#   PRUNE            0 keeps superseded (dangling) build images; default: podman prunes them
# Extra arguments are passed to the build command (e.g. --no-cache).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BASE_IMAGE=${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}
VARIANT=${VARIANT:-gpu}
IMAGE=${IMAGE:-servekit:$VARIANT}
WHEELS=build/wheels
LOCK_PYTHON=3.11
if [[ -z ${ENGINE:-} ]]; then
  if command -v podman >/dev/null; then ENGINE=podman; else ENGINE=docker; fi
fi
if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi

log() { printf '[build] %s\n' "$*" >&2; }

case $VARIANT in
  cpu) TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu} ;;
  gpu) TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu130} ;;
  *) log "VARIANT must be gpu or cpu, got '$VARIANT'"; exit 2 ;;
esac
case ${TORCH_INDEX_URL%/} in
  pypi | https://pypi.org/simple) TORCH_SOURCE=pypi ;;
  *) TORCH_SOURCE=index ;;
esac

# ---- python version of the base image -----------------------------------------------------------
if "$ENGINE" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  base_py=$("$ENGINE" run --rm --network none --entrypoint python3 "$BASE_IMAGE" \
    -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
  if [[ -n $base_py && $base_py != "$LOCK_PYTHON" ]]; then
    log "$BASE_IMAGE has python $base_py; the locks in requirements/ are for python $LOCK_PYTHON."
    log "use a Debian bookworm base, or change TARGET in scripts/lock.sh and run make lock"
    exit 2
  fi
fi
log "engine $ENGINE, base $BASE_IMAGE, variant $VARIANT, torch from $TORCH_INDEX_URL -> $IMAGE"

# ---- 1. wheelhouse ------------------------------------------------------------------------------
# build/wheels/common: the image lock and the build backend; build/wheels/torch-<source>: each
# source's torch set, kept side by side; build/wheels/torch: links to this build's torch set
# (one torch build only, so that pip can never pick another). Wheels are for the image's python
# and platform, whatever the host runs; present files are reused (pip checks their hashes).
t0=$(date +%s)
plat=(--only-binary=:all: --implementation cp --python-version "$LOCK_PYTHON")
for minor in $(seq 17 39); do plat+=(--platform "manylinux_2_${minor}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform linux_x86_64)
download() {
  "$PYTHON" -m pip download "${plat[@]}" "$@" >>build/wheels.log 2>&1 || {
    tail -30 build/wheels.log >&2
    log "download failed (build/wheels.log); TORCH_INDEX_URL=pypi takes torch from PyPI"
    exit 1
  }
}
mkdir -p "$WHEELS/common"
: >build/wheels.log
log "downloading the locked wheels into $WHEELS (GBs the first time: torch and its CUDA libraries)"
if [[ $TORCH_SOURCE == pypi ]]; then
  torch_dir=$WHEELS/torch-pypi
  "$PYTHON" docker/requirements.py "$VARIANT" pypi "$WHEELS"
  download --dest "$torch_dir" --no-deps --require-hashes --requirement "$WHEELS/torch-requirements.txt"
else
  # The lock's torch and torchvision versions: that index's build of them, with its dependencies.
  torch_dir=$WHEELS/torch-$(basename "${TORCH_INDEX_URL%/}")
  pair=$(grep -oE '^(torch|torchvision)==[^ ;]+' requirements/torch.txt)
  # Only that index: no find-links or extra indexes from pip's configuration, which could hold
  # another build of the same version (PyPI's CUDA torch is also "2.14.1").
  # shellcheck disable=SC2086 # $pair is two requirement words
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS="" PIP_EXTRA_INDEX_URL="" \
    download --dest "$torch_dir" --index-url "$TORCH_INDEX_URL" $pair
  "$PYTHON" docker/requirements.py "$VARIANT" "$torch_dir" "$WHEELS"
fi
rm -rf "$WHEELS/torch"
mkdir -p "$WHEELS/torch"
ln "$torch_dir"/*.whl "$WHEELS/torch/" 2>/dev/null || cp "$torch_dir"/*.whl "$WHEELS/torch/"
download --dest "$WHEELS/common" --no-deps --require-hashes --requirement "$WHEELS/requirements.txt"
download --dest "$WHEELS/common" --no-deps --require-hashes --requirement requirements/build.txt
cp requirements/build.txt "$WHEELS/build-requirements.txt"
log "wheelhouse ready in $(($(date +%s) - t0))s ($(du -sh "$WHEELS/torch" "$WHEELS/common" | cut -f1 | paste -sd+) torch+common)"

# ---- 2. image -----------------------------------------------------------------------------------
args=(-f docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VARIANT=$VARIANT")
t0=$(date +%s)
if [[ $ENGINE == podman ]]; then
  # docker format keeps HEALTHCHECK (the OCI image format has no field for it).
  args+=(--format docker --ignorefile docker/Dockerfile.dockerignore --layers)
  # Tag the venv stage (the locked dependencies, GBs) so that pruning below keeps it as the
  # layer cache of the next build; with everything cached this takes seconds.
  base_id=$VARIANT-$(printf '%s' "$BASE_IMAGE" | sha256sum | cut -c1-12)
  # An uncached venv layer needs about twice the wheelhouse (the installed venv plus the layer
  # being committed); fail up front with a clear message instead of "no space left" mid-build.
  store=$(podman info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers)
  mkdir -p "$store"
  free_mb=$(df -Pm "$store" | awk 'NR == 2 {print $4}')
  need_mb=$((2 * $(du -smL "$WHEELS/torch" "$WHEELS/common" | awk '{s += $1} END {print s}') + 2048))
  if ((free_mb < need_mb)); then
    if podman image exists "localhost/servekit-cache:venv-$base_id"; then
      log "warning: only ${free_mb} MB free in $store; fine if the venv layer is cached"
    else
      log "only ${free_mb} MB free in $store; the image build needs about ${need_mb} MB."
      log "free some space (podman image prune -a; podman system df shows what is used)"
      exit 1
    fi
  fi
  podman build "${args[@]}" --target venv --tag "localhost/servekit-cache:venv-$base_id" "$@" .
else
  export DOCKER_BUILDKIT=1 # RUN --mount and docker/Dockerfile.dockerignore need BuildKit
fi
"$ENGINE" build "${args[@]}" --tag "$IMAGE" "$@" .
log "built $IMAGE in $(($(date +%s) - t0))s"
if [[ $ENGINE == podman && ${PRUNE:-1} != 0 ]]; then
  # Superseded builds of this Dockerfile (untagged, nothing built on them) would otherwise fill
  # the disk by several GB per dependency change. PRUNE=0 keeps them.
  podman image prune --force --filter label=io.servekit.build=servekit >/dev/null
  log "pruned superseded servekit build images"
fi
