#!/usr/bin/env bash
# Prepare this machine (Debian bookworm, root, no Docker daemon, no image registry) to build
# and run the servekit container with podman:
#   1. install podman, runc and friends plus debootstrap from apt (only what is missing);
#   2. install docker/containers.conf (runc, host-compatible ulimits) and a storage.conf
#      (overlay when the kernel allows it here, vfs otherwise);
#   3. build a minimal Debian bookworm rootfs with debootstrap and `podman import` it as
#      localhost/debian-base:bookworm, the BASE_IMAGE that CI passes to docker/Dockerfile.
# Idempotent: every step is skipped when already done. Rebuild the base image with
# FORCE_BASE=1. Override the mirror with DEBIAN_MIRROR=http://.../debian.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE_TAG=${BASE_TAG:-localhost/debian-base:bookworm}
SUITE=${SUITE:-bookworm}
# Packages of the base rootfs: the runtime of the final image (so the image build does not
# need apt inside the build) plus python3-venv for the builder stage.
# nginx-light: the pod's authenticating proxy (`servekit proxy`); curl: podman runs an httpGet
# liveness probe as curl inside the container.
BASE_PACKAGES=${BASE_PACKAGES:-python3,python3-venv,ca-certificates,openjdk-17-jre-headless,tini,nginx-light,curl}
# Versions tested on bookworm (2025): podman 4.3.1+ds1-8+deb12u1+b3, runc 1.1.5+ds1-1+deb12u1,
# conmon 2.1.6+ds1-1, fuse-overlayfs 1.10-1, slirp4netns 1.2.0-1, uidmap 1:4.13+dfsg1-1+deb12u2,
# containernetworking-plugins 1.1.1+ds1-3+b5, iptables 1.8.9-2, debootstrap 1.0.128+nmu2+deb12u2.
# Not pinned on purpose: Debian drops superseded point-release versions from its mirror.
APT_PACKAGES=(podman runc conmon uidmap fuse-overlayfs slirp4netns containernetworking-plugins
  iptables debootstrap catatonit)

log() { printf '[podman-setup] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root (rootful podman; debootstrap needs root)"
  exit 1
fi

# --- 1. packages -------------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "apt packages already installed"
fi

# --- 2. configuration --------------------------------------------------------------------
install -d -m 0755 /etc/containers
if ! cmp -s "$HERE/containers.conf" /etc/containers/containers.conf; then
  install -m 0644 "$HERE/containers.conf" /etc/containers/containers.conf
  log "wrote /etc/containers/containers.conf"
fi

STORAGE_MARK='# servekit: storage driver chosen by docker/podman-setup.sh'
if grep -qF "$STORAGE_MARK" /etc/containers/storage.conf 2>/dev/null; then
  log "storage.conf already set up ($(grep -E '^driver' /etc/containers/storage.conf))"
else
  # Probe overlay in a throw-away store so an existing store is never touched.
  probe=$(mktemp -d /var/tmp/podman-probe.XXXXXX)
  driver=vfs
  if podman --root "$probe/root" --runroot "$probe/run" --storage-driver overlay \
      info --format '{{.Store.GraphDriverName}}' >/dev/null 2>&1; then
    driver=overlay
  fi
  rm -rf "$probe"
  if [[ -d /var/lib/containers/storage/overlay || -d /var/lib/containers/storage/vfs ]]; then
    # A store exists already: keep its driver, switching would orphan its images.
    for d in overlay vfs; do
      [[ -d /var/lib/containers/storage/$d-images ]] && driver=$d
    done
  fi
  { echo "$STORAGE_MARK"; sed "s/^driver = .*/driver = \"$driver\"/" "$HERE/storage.conf"; } \
    >/etc/containers/storage.conf
  log "wrote /etc/containers/storage.conf (driver $driver)"
fi

# --- 3. base image -----------------------------------------------------------------------
# The Debian mirror the host uses (deb822 .sources or one-line sources.list).
detect_mirror() { # $1: "main" or "security"
  local kind=$1 files url
  files=$(ls /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [[ -n $files ]] || return 0
  # shellcheck disable=SC2086
  url=$(awk -v kind="$kind" '
    /^URIs:/ { uris=$2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) {
        sec = ($i ~ /-security$/); if ((kind == "security") == sec && $i ~ /^bookworm/) { print uris; exit } } }
    /^deb[ \t]/ { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { u=$i; s=$(i+1); break }
        sec = (s ~ /-security$/); if ((kind == "security") == sec && s ~ /^bookworm/) { print u; exit } }
  ' $files)
  printf '%s' "$url"
}

# The commands the image needs from the base (one per package above, where it has one).
BASE_COMMANDS=${BASE_COMMANDS:-python3 java tini nginx curl}
if podman image exists "$BASE_TAG" && [[ -z ${FORCE_BASE:-} ]]; then
  # shellcheck disable=SC2086
  if podman run --rm --network none --entrypoint sh "$BASE_TAG" -c \
      "for c in $BASE_COMMANDS; do command -v \$c >/dev/null || exit 1; done"; then
    log "$BASE_TAG exists with $BASE_COMMANDS; skipping debootstrap (FORCE_BASE=1 rebuilds)"
    exit 0
  fi
  log "$BASE_TAG lacks one of $BASE_COMMANDS: rebuilding it"
fi

MIRROR=${DEBIAN_MIRROR:-$(detect_mirror main)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(detect_mirror security)}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
log "debootstrap $SUITE from $MIRROR (packages: $BASE_PACKAGES)"

rootfs=$(mktemp -d /var/tmp/debian-base.XXXXXX)
cleanup() {
  # debootstrap may leave proc/sys mounted if it failed half-way.
  for m in proc sys dev/pts dev; do
    mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m" || true
  done
  rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

start=$(date +%s)
debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR"

# apt sources inside the image: the same mirror, with updates and security.
rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# Slim down: no package lists, caches, logs, docs or man pages in the image.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log \
  "$rootfs"/var/cache/debconf/*-old "$rootfs"/tmp/* "$rootfs"/usr/share/doc/* \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
: >"$rootfs/etc/machine-id"
# Like the official Debian images: keep dpkg from reinstalling docs, and apt from recommends.
mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d" "$rootfs/etc/apt/apt.conf.d"
printf 'path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n' \
  >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim"
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
  >"$rootfs/etc/apt/apt.conf.d/99no-recommends"

podman rmi -f "$BASE_TAG" >/dev/null 2>&1 || true
tar --numeric-owner --xattrs -C "$rootfs" -c . |
  podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE ($BASE_PACKAGES)" \
    - "$BASE_TAG" >/dev/null
log "imported $BASE_TAG in $(($(date +%s) - start))s"
podman image ls "$BASE_TAG" >&2
