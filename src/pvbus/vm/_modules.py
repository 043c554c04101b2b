"""Kernel modules of a Debian kernel tree: read ``.modinfo``, resolve dependencies, order them.

No modprobe or depmod is needed (nor available in the guest): the initramfs carries plain,
decompressed ``.ko`` files and a list in load order for busybox ``insmod``.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KernelModule",
    "ModuleError",
    "ModuleIndex",
    "decompress_module",
    "module_name",
    "parse_modinfo",
    "read_modinfo",
]

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2


class ModuleError(Exception):
    """A module is missing, unreadable or has a dependency cycle."""


def module_name(path: str | Path) -> str:
    """The kernel's name for a module file: ``virtio-rng.ko.xz`` -> ``virtio_rng``."""
    name = Path(path).name
    name = name.split(".ko", 1)[0]
    return name.replace("-", "_")


def decompress_module(path: Path) -> bytes:
    """The ELF bytes of a ``.ko``, ``.ko.xz``, ``.ko.zst`` or ``.ko.gz`` file."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if path.name.endswith(".zst"):
        import subprocess

        out = subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
        return out
    return data


def parse_modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section, by key."""
    if elf[:4] != _ELF_MAGIC or elf[4] != _ELFCLASS64:
        raise ModuleError("not an ELF64 object")
    endian = "<" if elf[5] == 1 else ">"
    (shoff,) = struct.unpack_from(endian + "Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from(endian + "IIQQQQ", elf, base)
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    names = elf[str_off : str_off + str_size]
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = names.index(b"\0", name_off)
        if names[name_off:end] != b".modinfo":
            continue
        info: dict[str, list[str]] = {}
        for raw in elf[offset : offset + size].split(b"\0"):
            if b"=" not in raw:
                continue
            key, _, value = raw.decode("utf-8", "replace").partition("=")
            info.setdefault(key, []).append(value)
        return info
    raise ModuleError("no .modinfo section")


def read_modinfo(path: Path) -> dict[str, list[str]]:
    """``.modinfo`` of a (possibly compressed) module file."""
    return parse_modinfo(decompress_module(path))


@dataclass(frozen=True, slots=True)
class KernelModule:
    """One loadable module: its name, file and hard plus ``softdep pre:`` dependencies."""

    name: str
    path: Path
    depends: tuple[str, ...]
    softdeps: tuple[str, ...]

    @classmethod
    def from_file(cls, path: Path) -> KernelModule:
        """Read a module's dependencies from its ``.modinfo``."""
        info = read_modinfo(path)
        depends = tuple(d for v in info.get("depends", []) for d in v.split(",") if d)
        return cls(module_name(path), path, depends, _softdeps_pre(info.get("softdep", [])))


def _softdeps_pre(values: Iterable[str]) -> tuple[str, ...]:
    """Module names after ``pre:`` in ``softdep=`` values (``post:`` ones are not needed)."""
    out: list[str] = []
    for value in values:
        mode = ""
        for word in value.split():
            if word.endswith(":"):
                mode = word[:-1]
            elif mode == "pre":
                out.append(module_name(word))
    return tuple(out)


class ModuleIndex:
    """The modules of one kernel tree (``lib/modules/<version>``), loaded lazily."""

    def __init__(self, files: Mapping[str, Path], builtin: Iterable[str]) -> None:
        self._files = dict(files)
        self._builtin = frozenset(builtin)
        self._cache: dict[str, KernelModule] = {}

    @classmethod
    def from_tree(cls, moddir: Path) -> ModuleIndex:
        """Index ``moddir/kernel/**.ko*`` and ``moddir/modules.builtin``."""
        files = {module_name(p): p for p in sorted(moddir.glob("kernel/**/*.ko*"))}
        builtin_file = moddir / "modules.builtin"
        builtin: list[str] = []
        if builtin_file.exists():
            builtin = [module_name(line) for line in builtin_file.read_text().split() if line]
        return cls(files, builtin)

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is compiled into the kernel image."""
        return module_name(name) in self._builtin

    def module(self, name: str) -> KernelModule:
        """The loadable module ``name`` (dashes and underscores alike)."""
        name = module_name(name)
        if name not in self._cache:
            path = self._files.get(name)
            if path is None:
                raise ModuleError(f"kernel module {name!r} not found")
            self._cache[name] = KernelModule.from_file(path)
        return self._cache[name]

    def resolve(self, wanted: Iterable[str]) -> list[KernelModule]:
        """``wanted`` plus dependencies, dependencies first; built-ins are skipped."""
        order: list[KernelModule] = []
        state: dict[str, str] = {}

        def visit(name: str, chain: tuple[str, ...]) -> None:
            name = module_name(name)
            if self.is_builtin(name) or state.get(name) == "done":
                return
            if state.get(name) == "active":
                raise ModuleError("dependency cycle: " + " -> ".join((*chain, name)))
            state[name] = "active"
            mod = self.module(name)
            for dep in mod.softdeps:
                if self.is_builtin(dep) or module_name(dep) in self._files:
                    visit(dep, (*chain, name))
            for dep in mod.depends:
                visit(dep, (*chain, name))
            state[name] = "done"
            order.append(mod)

        for name in wanted:
            visit(name, ())
        return order
