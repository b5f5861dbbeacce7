"""Keeping the thread's alternate signal stack valid around OpenVINO's CPU plugin.

Each model OpenVINO's CPU plugin compiles installs a fresh alternate signal stack on the
compiling thread (big enough for AMX state) and, when the model is destroyed, frees it, putting
back the stack it found only if its own is still the current one. Models destroyed in another
order than they were made (the normal case: the first one freed first) leave the thread on a
freed stack. Python runs its signal handlers on the alternate stack, so the next signal with a
handler (SIGCHLD once a torch DataLoader has used workers, when any subprocess exits) cannot be
delivered and the kernel kills the process with SIGSEGV, without a traceback.

:func:`kept_signal_stack` puts the caller's stack back as soon as OpenVINO returns, so no stack of
OpenVINO's is ever current once its call is over, and its destructors never restore a freed one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from contextlib import contextmanager
from typing import Iterator

#: Bytes of the stack installed when the caller's own is now too small (AMX state needs about 11 KiB).
FALLBACK_STACK_BYTES = 64 * 1024

_SS_DISABLE = 2


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
#: Stacks this module installed: kept for the life of the process, as the kernel may still use them.
_owned_stacks: list[mmap.mmap] = []


def _current() -> _StackT:
    stack = _StackT()
    _libc.sigaltstack(None, ctypes.byref(stack))
    return stack


def _install(stack: _StackT) -> bool:
    return _libc.sigaltstack(ctypes.byref(stack), None) == 0


def _install_fallback(size: int) -> None:
    """A stack of hubkit's own, never freed, for when the caller's is smaller than the CPU now needs."""
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _owned_stacks.append(memory)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    _install(_StackT(address, 0, size))


@contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Run the block (an OpenVINO compile or quantization), then give the thread back its signal stack.

    Where the kernel refuses the old stack as too small for state the block enabled (AMX), a larger
    stack of hubkit's own takes its place. A no-op off Linux."""
    if _libc is None:
        yield
        return
    before = _current()
    try:
        yield
    finally:
        after = _current()
        if after.ss_sp != before.ss_sp or after.ss_flags != before.ss_flags:
            restored = _StackT(before.ss_sp, _SS_DISABLE if before.ss_flags & _SS_DISABLE else 0, before.ss_size)
            if not _install(restored):
                _install_fallback(max(FALLBACK_STACK_BYTES, after.ss_size))
