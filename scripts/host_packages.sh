#!/usr/bin/env bash
# Debian packages the test suite uses on the host (as root; a no-op when they are there):
#   nginx-light  the pod's proxy configuration is checked with the real `nginx -t`
# Debian starts nginx on port 80 when it installs it; nothing here needs that server, so it is stopped.
set -euo pipefail
PACKAGES=(nginx-light)
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
  service nginx stop >/dev/null 2>&1 || true
fi
echo "host_packages: ${PACKAGES[*]} installed"
