#!/usr/bin/env bash
# What the test suite uses on the host, besides the project's venv (as root; a no-op when present):
#   nginx-light  the pod's proxy: its configuration checked with the real `nginx -t`, and run in front
#                of a test server
#   prometheus   promtool (rule unit tests) and a real Prometheus scraping a test server
#   node, npm    the CRD schema checks of the Prometheus Operator objects (tests/support/crd)
# Debian starts nginx and Prometheus as services when it installs them; the tests start their own,
# so those are stopped.
set -euo pipefail
PACKAGES=(nginx-light prometheus)
command -v node >/dev/null && command -v npm >/dev/null || PACKAGES+=(nodejs npm)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "host_packages: need root to install ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  for service in nginx prometheus; do service "$service" stop >/dev/null 2>&1 || true; done
fi
# The CRD validators, pinned by tests/support/crd/package-lock.json.
if [[ ! -d tests/support/crd/node_modules ]]; then
  (cd tests/support/crd && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "host_packages: ${PACKAGES[*]} and the CRD validators installed"
