#!/usr/bin/env bash
# `make setup`: install what Kiln needs on a Debian machine, idempotently.
# Fast the second time: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils   # the hypervisor and qcow2 tooling (qemu-img, qemu-io)
  qemu-system-common           # qemu-storage-daemon: FUSE raw views of volume images for e2fsprogs
  mmdebstrap busybox-static e2fsprogs cpio zstd  # image builds
  nftables iproute2 conntrack  # guest networking (conntrack: closing flows a policy change forbids)
  skopeo                       # OCI imports from registries (KILN_OCI_REGISTRIES)
  python3-venv                 # the project's virtualenv
)
# The dashboard's assets come from the npm registry (scripts/assets.sh); a machine whose
# Node.js came from elsewhere already has npm, and Debian's npm would conflict with it.
command -v npm >/dev/null || APT_PACKAGES+=(npm)

missing=()
for pkg in "${APT_PACKAGES[@]}" "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages (${missing[*]}); run as root or install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Volumes' raw views are FUSE exports (kiln/volumes/rawview.py).
if [[ ! -e /dev/fuse && $(id -u) -eq 0 ]]; then
  modprobe fuse 2>/dev/null || echo "setup: no /dev/fuse; host-side volume checks and resizes will fail" >&2
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
# Reinstall only when the project's dependency list changed.
stamp=.venv/.kiln-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: installing kiln into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi

# The dashboard's JavaScript and CSS, pinned and checked (fast when already there).
scripts/assets.sh

# Build (or find in the cache) the image variants asked for; `default` always.
for variant in ${KILN_SETUP_VARIANTS:-default}; do
  .venv/bin/kiln images build "$variant"
done
