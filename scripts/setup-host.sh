#!/usr/bin/env bash
# Install the host packages pvbus needs on Debian 12 (bookworm): QEMU 10 and Linux 6.12 from
# bookworm-backports, busybox-static, and the tools the tests use. Idempotent; run as root.
# Also qemu-system-s390x and dpkg's s390x architecture, for the ccw transport's s390x guest
# (its kernel and busybox are only downloaded and unpacked by `pvbus guest build --arch s390x`,
# never installed).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/pvbus-backports.list >/dev/null
fi
update=0
if ! dpkg --print-foreign-architectures | grep -qx s390x; then
  $SUDO dpkg --add-architecture s390x
  update=1
fi
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
need_bp=()
for p in qemu-system-x86 qemu-system-s390x qemu-utils; do
  if ! have "$p" || ! dpkg-query -W -f='${Version}' "$p" | grep -q '^1:10'; then need_bp+=("$p"); fi
done
need=()
for p in busybox-static e2fsprogs xz-utils zstd cpio iproute2 passt python3-venv python3-dev gcc; do have "$p" || need+=("$p"); done
if [ ${#need_bp[@]} -gt 0 ] || [ ${#need[@]} -gt 0 ] || [ $update -eq 1 ]; then
  $SUDO apt-get update -q
  [ ${#need_bp[@]} -eq 0 ] || $SUDO apt-get install -y -q --no-install-recommends -t bookworm-backports "${need_bp[@]}"
  [ ${#need[@]} -eq 0 ] || $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
