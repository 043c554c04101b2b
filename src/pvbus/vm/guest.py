"""The guest image: a Debian kernel (bzImage) plus a busybox initramfs that runs one command.

``build_guest`` downloads ``linux-image-amd64`` (resolved to its concrete package) and
``busybox-static`` with ``apt-get download``, extracts them with ``dpkg-deb -x`` and writes
``vmlinuz`` + ``initramfs.img`` into a cache directory keyed by the kernel version and a hash
of everything that goes into the initramfs, so a second build is instant.

``arch="s390x"`` builds the guest of the ``ccw`` transport the same way from
``linux-image-s390x:s390x`` and ``busybox-static:s390x`` (dpkg must know the foreign
architecture: ``dpkg --add-architecture s390x``, as scripts/setup-host.sh does). Nothing is
installed; the foreign packages are kept in ``debs/s390x``. The s390x busybox cannot run here
to list its applets, so the list comes from the host architecture's busybox-static of the
same version; the x86-64 ``vsock-exec`` helper is left out (QEMU has no vhost-user vsock on
CCW, so a ccw guest's command channel is the virtio-serial port).

Guest protocol (see ``INIT_SCRIPT``): the runner appends a small cpio archive holding
``/pvbus/cmd`` (a ``sh -c`` script) and ``/pvbus/marker``; ``/init`` runs the command with
stdout and stderr on the virtio-serial port named ``org.pvbus.out``, then writes
``<marker> <status>\\n`` on that port and powers off. The kernel console (ttyS0) is only for
diagnostics.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from pvbus.vm._cpio import CpioWriter
from pvbus.vm._modules import ModuleIndex, decompress_module
from pvbus.vm._vsock_helper import helper_elf

__all__ = [
    "ARCHES",
    "DEFAULT_ARCH",
    "DEFAULT_SUITE",
    "GUEST_MODULES",
    "INIT_SCRIPT",
    "OUTPUT_PORT",
    "SUITES",
    "GuestBuildError",
    "GuestImage",
    "build_guest",
    "cache_root",
    "command_archive",
    "default_guest",
    "guest_modules",
    "resolve_kernel_package",
]

#: Debian suites a kernel can come from.
SUITES = ("bookworm-backports", "bookworm")
DEFAULT_SUITE = "bookworm-backports"

#: Name of the virtio-serial port that carries the command's output and status.
OUTPUT_PORT = "org.pvbus.out"

#: Debian architectures a guest can be built for: the host's (amd64) and s390x (ccw).
ARCHES = ("amd64", "s390x")
DEFAULT_ARCH = "amd64"

#: Modules the guest loads (with their dependencies); built-ins are skipped.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "crc32c_generic",
    "ext4",
)
#: s390x: virtio-ccw is built in (CONFIG_S390_GUEST), so no transport modules.
_S390X_MODULES = tuple(m for m in GUEST_MODULES if m not in ("virtio_pci", "virtio_mmio"))


def guest_modules(arch: str = DEFAULT_ARCH) -> tuple[str, ...]:
    """The modules a guest of ``arch`` loads."""
    return _S390X_MODULES if arch == "s390x" else GUEST_MODULES


#: Bump when the layout of the built image changes.
_BUILD_VERSION = 2

#: ``/pvbus/run``: the command with its output and status on stdout (the vsock stream).
RUN_SCRIPT = """#!/bin/sh
touch /tmp/.pvbus-ran
cd /root
sh /pvbus/cmd </dev/null 2>&1
rc=$?
sync
printf '%s %d\\n' "$(cat /pvbus/marker)" "$rc"
"""

Progress = Callable[[str], None]

INIT_SCRIPT = f"""#!/bin/sh
# pvbus guest init: load virtio modules, run /pvbus/cmd, report its status, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
while read -r mod; do
  insmod "/lib/modules/$mod" || echo "pvbus-init: insmod $mod failed"
done < /pvbus/modules
hostname pvbus
ip link set lo up 2>/dev/null
if [ -f /pvbus/interactive ]; then
  # No command: an interactive shell on hvc0 (its settings: TERM, rows, cols), then off.
  . /pvbus/interactive
  export TERM rows cols
  i=0
  while [ ! -e /dev/hvc0 ] && [ $i -lt 500 ]; do usleep 10000; i=$((i + 1)); done
  echo "pvbus-init: running command"
  cd /root
  # The size is set while the shell holds hvc0 open (a tty forgets it on last close).
  PS1='pvbus:\\w# ' setsid sh -c 'exec <>/dev/hvc0 >&0 2>&1
    [ -n "$rows" ] && stty rows "$rows" cols "$cols"
    unset rows cols
    exec sh'
  sync
  poweroff -f
fi
if [ -f /pvbus/vsock_port ]; then
  # Output and status over vsock to host port N (the runner listens); vsock-exec exits
  # 111 before running anything if it cannot connect: then use the virtio-serial port.
  echo "pvbus-init: running command"
  vsock-exec c 2 "$(cat /pvbus/vsock_port)" /bin/sh /pvbus/run
  [ -f /tmp/.pvbus-ran ] && poweroff -f
  echo "pvbus-init: no vsock connection; using the virtio-serial port"
fi
out=""
i=0
while [ -z "$out" ] && [ $i -lt 500 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "{OUTPUT_PORT}" ] && out="/dev/${{p##*/}}"
  done
  [ -z "$out" ] && usleep 10000
  i=$((i + 1))
done
if [ -z "$out" ] || [ ! -f /pvbus/cmd ]; then
  echo "pvbus-init: no output port or no command"
  poweroff -f
fi
echo "pvbus-init: running command"
exec 3>"$out"
cd /root
sh /pvbus/cmd </dev/null >&3 2>&3
rc=$?
sync
printf '%s %d\\n' "$(cat /pvbus/marker)" "$rc" >&3
exec 3>&-
poweroff -f
"""


class GuestBuildError(Exception):
    """The guest image could not be built (apt, dpkg-deb or a missing module)."""


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built guest: a bzImage, its base initramfs and the kernel version."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    #: Debian architecture of the kernel and busybox (amd64, s390x).
    arch: str = DEFAULT_ARCH

    def to_json(self) -> str:
        """JSON for the cache's ``guest.json``."""
        return json.dumps({k: str(v) for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> GuestImage:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        arch = d.get("arch", DEFAULT_ARCH)
        return cls(Path(d["kernel"]), Path(d["initramfs"]), d["kernel_version"], arch)


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/pvbus`` or ``~/.cache/pvbus``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pvbus"


def _stderr(msg: str) -> None:
    print(f"pvbus: {msg}", file=sys.stderr, flush=True)


def _run(argv: list[str], *, cwd: Path | None = None, quiet: bool = False) -> str:
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            check=False,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if quiet else None,
            text=True,
        )
    except FileNotFoundError as err:
        raise GuestBuildError(f"{argv[0]} not found (Debian's apt and dpkg are needed)") from err
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise GuestBuildError(f"{' '.join(argv[:3])} failed: {' '.join(detail)}".rstrip(": "))
    return proc.stdout


def _depends_of(meta: str, suite: str) -> str | None:
    out = _run(["apt-cache", "depends", "-t", suite, meta], quiet=True)
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip().strip("<>")
    return None


def _qualified(pkg: str, arch: str) -> str:
    """``pkg`` for apt: ``pkg:arch`` for a foreign architecture."""
    return pkg if arch == DEFAULT_ARCH else f"{pkg}:{arch}"


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise GuestBuildError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHES)})")
    if arch == DEFAULT_ARCH:
        return
    foreign = _run(["dpkg", "--print-foreign-architectures"], quiet=True).split()
    if arch not in foreign:
        raise GuestBuildError(
            f"dpkg does not know the {arch} architecture: run 'dpkg --add-architecture {arch} "
            "&& apt-get update' (scripts/setup-host.sh does)"
        )


def resolve_kernel_package(
    suite: str = DEFAULT_SUITE, *, update: bool = True, arch: str = DEFAULT_ARCH
) -> str:
    """The concrete ``linux-image-<version>-<arch>`` behind ``linux-image-<arch>`` in ``suite``.

    Runs ``apt-get update`` once if the package lists do not know the suite (and ``update``).
    """
    if suite not in SUITES:
        raise GuestBuildError(f"unknown kernel suite {suite!r} (choose from {', '.join(SUITES)})")
    _check_arch(arch)
    meta = _qualified(f"linux-image-{arch}", arch)
    try:
        pkg = _depends_of(meta, suite)
    except GuestBuildError:
        pkg = None
    if pkg is None and update:
        _stderr("package lists do not know the kernel; running apt-get update")
        _run(["apt-get", "update", "-q"], quiet=True)
        return resolve_kernel_package(suite, update=False, arch=arch)
    if pkg is None:
        raise GuestBuildError(f"cannot resolve {meta} in {suite}")
    return pkg


def _download(pkg: str, suite: str | None, dest: Path, progress: Progress) -> Path:
    """``apt-get download`` into ``dest`` (reusing a previous download) -> the .deb.

    ``pkg`` may name its architecture (``busybox-static:s390x``); without, it is amd64.
    """
    dest.mkdir(parents=True, exist_ok=True)
    name, _, arch = pkg.partition(":")
    found = sorted(dest.glob(f"{name}_*_{arch or DEFAULT_ARCH}.deb"))
    if found:
        return found[-1]
    progress(f"downloading {pkg}")
    argv = ["apt-get", "download"]
    if os.geteuid() == 0:
        argv += ["-o", "APT::Sandbox::User=root"]
    if suite:
        argv += ["-t", suite]
    # The download directory must be writable by _apt or apt warns and downloads as root.
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl-") as tmp:
        os.chmod(tmp, 0o777)
        _run([*argv, pkg], cwd=Path(tmp))
        debs = sorted(Path(tmp).glob("*.deb"))
        if not debs:
            raise GuestBuildError(f"apt-get download {pkg} produced no .deb")
        final = dest / debs[0].name
        debs[0].replace(final)
    return final


def _key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def _guest_dir(cache: Path, kernel_deb: str, busybox_deb: str, modules: Iterable[str]) -> Path:
    key = _key(str(_BUILD_VERSION), INIT_SCRIPT, RUN_SCRIPT, busybox_deb, *modules)
    return cache / "guests" / f"{kernel_deb.removesuffix('.deb')}-{key}"


def _deb_version(deb: Path) -> str:
    """The version in a .deb's file name, without a binNMU suffix (``+b1``)."""
    version = deb.name.split("_")[1]
    head, sep, tail = version.rpartition("+b")
    return head if sep and tail.isdigit() else version


def build_guest(
    *,
    suite: str = DEFAULT_SUITE,
    cache_dir: Path | None = None,
    modules: Iterable[str] | None = None,
    progress: Progress | None = _stderr,
    force: bool = False,
    arch: str = DEFAULT_ARCH,
) -> GuestImage:
    """Build (or find in the cache) the ``arch`` guest for the newest kernel of ``suite``."""
    say: Progress = progress or (lambda _msg: None)
    cache = cache_dir or cache_root()
    modules = tuple(guest_modules(arch) if modules is None else modules)
    pkg = resolve_kernel_package(suite, arch=arch)
    debs = cache / "debs"
    # Foreign packages apart, so nothing looking for the host's ever finds them.
    arch_debs = debs if arch == DEFAULT_ARCH else debs / arch
    kernel_deb = _download(pkg, suite, arch_debs, say)
    busybox_deb = _download(_qualified("busybox-static", arch), None, arch_debs, say)
    lister_deb = busybox_deb
    if arch != DEFAULT_ARCH:
        # The applet list comes from the host's busybox-static of the same version.
        lister_deb = _download("busybox-static", None, debs, say)
        if _deb_version(lister_deb) != _deb_version(busybox_deb):
            say(f"warning: applets listed by {lister_deb.name} for {busybox_deb.name}")
    gdir = _guest_dir(cache, kernel_deb.name, busybox_deb.name, modules)
    meta = gdir / "guest.json"
    if meta.exists() and not force:
        return GuestImage.from_json(meta.read_text())
    say(f"building guest in {gdir}")
    gdir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gdir.parent, prefix=".build-") as tmp_s:
        tmp = Path(tmp_s)
        say(f"extracting {kernel_deb.name}")
        _run(["dpkg-deb", "-x", str(kernel_deb), str(tmp / "kernel")])
        _run(["dpkg-deb", "-x", str(busybox_deb), str(tmp / "busybox")])
        busybox = tmp / "busybox" / "bin" / "busybox"
        lister = busybox
        if lister_deb != busybox_deb:
            _run(["dpkg-deb", "-x", str(lister_deb), str(tmp / "lister")])
            lister = tmp / "lister" / "bin" / "busybox"
        vmlinuz = sorted((tmp / "kernel" / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise GuestBuildError(f"{kernel_deb.name} has no /boot/vmlinuz-*")
        version = vmlinuz[-1].name.removeprefix("vmlinuz-")
        moddir = tmp / "kernel" / "lib" / "modules" / version
        say(f"building initramfs for {version}")
        image = _initramfs(
            busybox, moddir, modules, applets=lister, vsock_helper=arch == DEFAULT_ARCH
        )
        out = tmp / "out"
        out.mkdir()
        shutil.copyfile(vmlinuz[-1], out / "vmlinuz")
        (out / "initramfs.img").write_bytes(image)
        config = tmp / "kernel" / "boot" / f"config-{version}"
        if config.exists():
            shutil.copyfile(config, out / "config")
        guest = GuestImage(gdir / "vmlinuz", gdir / "initramfs.img", version, arch)
        (out / "guest.json").write_text(guest.to_json())
        if gdir.exists():
            shutil.rmtree(gdir)
        out.replace(gdir)
    say(f"guest ready: kernel {version}")
    return guest


def _busybox_applets(busybox: Path) -> list[str]:
    out = _run([str(busybox), "--list-full"], quiet=True)
    return [line.strip() for line in out.splitlines() if line.strip()]


def _initramfs(
    busybox: Path,
    moddir: Path,
    modules: Iterable[str],
    *,
    applets: Path | None = None,
    vsock_helper: bool = True,
) -> bytes:
    """The gzip'd base initramfs: busybox, ``/init`` and decompressed modules in load order.

    ``applets``: a busybox of this host that lists the applets (when ``busybox`` cannot run
    here); ``vsock_helper``: include the x86-64 ``vsock-exec``.
    """
    index = ModuleIndex.from_tree(moddir)
    try:
        ordered = index.resolve(modules)
    except Exception as err:
        raise GuestBuildError(str(err)) from err
    cpio = CpioWriter()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev"):
        cpio.directory(d)
    for d in ("tmp", "run", "root", "mnt", "lib", "lib/modules", "pvbus"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _busybox_applets(applets or busybox):
        if applet != "bin/busybox":
            depth = applet.count("/")
            cpio.symlink(applet, "../" * depth + "bin/busybox")
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("pvbus/run", RUN_SCRIPT.encode(), 0o755)
    if vsock_helper:
        cpio.file("bin/vsock-exec", helper_elf(), 0o755)
    names: list[str] = []
    for mod in ordered:
        fname = f"{mod.name}.ko"
        cpio.file(f"lib/modules/{fname}", decompress_module(mod.path))
        names.append(fname)
    cpio.file("pvbus/modules", "".join(f"{n}\n" for n in names).encode())
    packed = gzip.compress(cpio.finish(), compresslevel=6, mtime=0)
    # Linux only looks for a following archive at a 4-byte aligned offset.
    return packed + b"\0" * (-len(packed) % 512)


def command_archive(
    command: str | None,
    marker: str,
    vsock_port: int | None = None,
    *,
    term: str = "vt100",
    size: tuple[int, int] | None = None,
) -> bytes:
    """The per-run cpio appended to the base initramfs: ``/pvbus/cmd`` and ``/pvbus/marker``,
    and ``/pvbus/vsock_port`` when the output is to come back over vsock.

    With no ``command``, ``/pvbus/interactive`` instead: the guest runs a shell on ``hvc0``
    for a terminal of type ``term`` and ``size`` (rows, columns).
    """
    cpio = CpioWriter()
    cpio.directory("pvbus")
    if command is None:
        settings = f"TERM={shlex.quote(term)}\n"
        if size is not None:
            settings += f"rows={size[0]}\ncols={size[1]}\n"
        cpio.file("pvbus/interactive", settings.encode())
    else:
        cpio.file("pvbus/cmd", command.encode() + b"\n", 0o755)
    cpio.file("pvbus/marker", marker.encode())
    if vsock_port is not None:
        cpio.file("pvbus/vsock_port", f"{vsock_port}\n".encode())
    return cpio.finish()


def default_guest(
    *,
    suite: str = DEFAULT_SUITE,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    arch: str = DEFAULT_ARCH,
) -> GuestImage:
    """The cached guest for ``suite``, built first if missing (quietly unless ``progress``)."""
    return build_guest(suite=suite, cache_dir=cache_dir, progress=progress, arch=arch)
