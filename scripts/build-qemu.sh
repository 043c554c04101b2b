#!/usr/bin/env bash
# Build a QEMU that can render pvbus's console (or any virtio id) to a guest: Debian's QEMU 10.0
# source with the generic vhost-user-device(-pci) made user-creatable (upstream marks it
# "not user creatable" to "stop users confusing themselves", so no packaged QEMU can create it).
#
#   bash scripts/build-qemu.sh [DIR]      # default DIR: ~/.cache/pvbus/qemu (about 7 min, 2 cores)
#   PVBUS_QEMU=DIR/qemu-pvbus bash scripts/test.sh -k console
#
# Only x86_64-softmmu with TCG, KVM and vhost-user is built; firmware comes from the installed
# Debian QEMU (/usr/share/qemu, /usr/share/seabios) through the qemu-pvbus wrapper.
set -euo pipefail
dir=${1:-$HOME/.cache/pvbus/qemu}
version=${QEMU_VERSION:-10.0.2}
mkdir -p "$dir"
cd "$dir"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  build-essential ninja-build pkg-config libglib2.0-dev libpixman-1-dev flex bison python3-venv
tarball="qemu_${version}+ds.orig.tar.xz"
if [ ! -f "$tarball" ]; then
  # The upstream source as Debian ships it, from the bookworm-backports source index.
  mkdir -p apt/lists/partial
  echo "deb-src http://deb.debian.org/debian bookworm-backports main" > apt/sources.list
  opts=(-o Dir::Etc::SourceList="$dir/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o Dir::State::Lists="$dir/apt/lists")
  apt-get "${opts[@]}" update -q
  # The Debian packaging tarball of the exact version may be gone; the upstream one is enough.
  apt-get "${opts[@]}" source --download-only "qemu" || true
  tarball=$(ls -1 qemu_*+ds.orig.tar.xz | tail -1)
fi
src=$(basename "$tarball" .orig.tar.xz | sed 's/_/-/; s/+ds//')
[ -d "$src" ] || tar xf "$tarball"
cd "$src"
sed -i 's/dc->user_creatable = false;/dc->user_creatable = true; \/* pvbus build *\//' \
  hw/virtio/vhost-user-device.c hw/virtio/vhost-user-device-pci.c
# Debian's +ds source has no firmware blobs: do not unpack or install them.
sed -i 's/^if unpack_edk2_blobs$/if false/' pc-bios/meson.build
[ -x "$dir/meson-venv/bin/meson" ] || {
  python3 -m venv "$dir/meson-venv"
  "$dir/meson-venv/bin/pip" install -q "meson==1.5.0" pycotap
}
mkdir -p build
cd build
[ -f build.ninja ] || ../configure --target-list=x86_64-softmmu --without-default-features \
  --enable-kvm --enable-tcg --enable-vhost-user --disable-install-blobs \
  --python="$dir/meson-venv/bin/python3"
ninja qemu-system-x86_64
cat > "$dir/qemu-pvbus" <<EOF
#!/bin/sh
# QEMU $version with vhost-user-device(-pci) user-creatable (scripts/build-qemu.sh).
exec "$PWD/qemu-system-x86_64" -L /usr/share/qemu -L /usr/share/seabios "\$@"
EOF
chmod +x "$dir/qemu-pvbus"
"$dir/qemu-pvbus" -device help | grep -q '"vhost-user-device-pci"'
echo "built: PVBUS_QEMU=$dir/qemu-pvbus"
