"""``vsock-exec``: a 481-byte static x86-64 Linux program that puts a vsock stream on stdio.

busybox has no AF_VSOCK, and the guest has no compiler, so the guest carries this helper::

    vsock-exec c CID PORT PROG [ARG...]   connect to CID:PORT, then exec PROG
    vsock-exec l PORT PROG [ARG...]       accept one connection on PORT, then exec PROG

with the connection as PROG's stdin and stdout (stderr is left alone). It exits with 111,
before running anything, when the socket cannot be made, connected or accepted, so a caller
can tell "no vsock" from PROG's own status.

The machine code below is :data:`ASSEMBLY` assembled with GNU as (``as --64``, then
``objcopy -O binary -j .text``); it is position independent and uses no data section, so
:func:`helper_elf` only wraps it in an ELF header and one PT_LOAD program header. A test
re-assembles the listing when binutils is installed and checks the bytes match.
"""

from __future__ import annotations

import struct

__all__ = ["ASSEMBLY", "CODE", "EXIT_NO_VSOCK", "helper_elf"]

#: Exit status when the vsock connection could not be set up (PROG did not run).
EXIT_NO_VSOCK = 111

ASSEMBLY = """\
.intel_syntax noprefix
.globl _start
_start:
    mov rbx, rsp
    cmp qword ptr [rbx], 4
    jl fail
    mov rsi, [rbx+16]
    movzx r12d, byte ptr [rsi]
    mov eax, 41
    mov edi, 40
    mov esi, 1
    xor edx, edx
    syscall
    test rax, rax
    js fail
    mov r13, rax
    sub rsp, 16
    xor eax, eax
    mov [rsp], rax
    mov [rsp+8], rax
    mov word ptr [rsp], 40
    cmp r12b, 'c'
    jne listen
    cmp qword ptr [rbx], 5
    jl fail
    mov rdi, [rbx+24]
    call atoi
    mov [rsp+8], eax
    mov rdi, [rbx+32]
    call atoi
    mov [rsp+4], eax
    mov eax, 42
    mov rdi, r13
    mov rsi, rsp
    mov edx, 16
    syscall
    test rax, rax
    js fail
    mov r14, r13
    lea r15, [rbx+40]
    jmp run
listen:
    cmp r12b, 'l'
    jne fail
    mov rdi, [rbx+24]
    call atoi
    mov [rsp+4], eax
    mov dword ptr [rsp+8], -1
    mov eax, 49
    mov rdi, r13
    mov rsi, rsp
    mov edx, 16
    syscall
    test rax, rax
    js fail
    mov eax, 50
    mov rdi, r13
    mov esi, 1
    syscall
    test rax, rax
    js fail
    mov eax, 43
    mov rdi, r13
    xor esi, esi
    xor edx, edx
    syscall
    test rax, rax
    js fail
    mov r14, rax
    mov eax, 3
    mov rdi, r13
    syscall
    lea r15, [rbx+32]
run:
    mov eax, 33
    mov rdi, r14
    xor esi, esi
    syscall
    mov eax, 33
    mov rdi, r14
    mov esi, 1
    syscall
    cmp r14, 1
    jle 1f
    mov eax, 3
    mov rdi, r14
    syscall
1:
    mov rax, [rbx]
    lea rdx, [rbx + rax*8 + 16]
    mov rdi, [r15]
    mov rsi, r15
    mov eax, 59
    syscall
fail:
    mov eax, 60
    mov edi, 111
    syscall
atoi:
    xor eax, eax
2:
    movzx ecx, byte ptr [rdi]
    sub ecx, 48
    cmp ecx, 9
    ja 3f
    imul eax, eax, 10
    add eax, ecx
    inc rdi
    jmp 2b
3:
    ret
"""

CODE = bytes.fromhex(
    "4889e348833b040f8c38010000488b7310440fb626b829000000bf28000000be0100000031d20f054885c00f"
    "88140100004989c54883ec1031c048890424488944240866c7042428004180fc63754848833b050f8cec0000"
    "00488b7b18e8ef00000089442408488b7b20e8e200000089442404b82a0000004c89ef4889e6ba100000000f"
    "054885c00f88b70000004d89ee4c8d7b28eb6e4180fc6c0f85a4000000488b7b18e8a700000089442404c744"
    "2408ffffffffb8310000004c89ef4889e6ba100000000f054885c07878b8320000004c89efbe010000000f05"
    "4885c07864b82b0000004c89ef31f631d20f054885c078514989c6b8030000004c89ef0f054c8d7b20b82100"
    "00004c89f731f60f05b8210000004c89f7be010000000f054983fe017e0ab8030000004c89f70f05488b0348"
    "8d54c310498b3f4c89feb83b0000000f05b83c000000bf6f0000000f0531c00fb60f83e93083f909770a6bc0"
    "0a01c848ffc7ebebc3"
)

_BASE = 0x400000
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")


def helper_elf() -> bytes:
    """The helper as an ELF executable (ET_EXEC at 0x400000, one R+X segment)."""
    headers = _EHDR.size + _PHDR.size
    size = headers + len(CODE)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    ehdr = _EHDR.pack(
        ident, 2, 0x3E, 1, _BASE + headers, _EHDR.size, 0, 0, _EHDR.size, _PHDR.size, 1, 0, 0, 0
    )
    phdr = _PHDR.pack(1, 5, 0, _BASE, _BASE, size, size, 0x1000)
    return ehdr + phdr + CODE
