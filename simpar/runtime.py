"""Process-level settings that make every simulated device use the machine well.

**Allocator.** A training step allocates and frees about a gigabyte of arrays.
With glibc's default thresholds, large freed blocks go straight back to the
kernel, so the next step pays the page faults again (measured: ~15 % of a
reference GPT step, and 2-3x the time of a fresh 1 MiB all-reduce output).
:func:`tune_malloc` raises the thresholds so freed memory is kept for reuse.
``import simpar`` calls it once; set ``SIMPAR_TUNE_MALLOC=0`` to keep glibc's
defaults.  On non-glibc systems it does nothing.
"""
from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``); True if applied."""
    global _tuned
    if _tuned:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)     # the largest value glibc allows
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    _tuned = bool(ok)
    return _tuned


def apply_defaults() -> None:
    if os.environ.get("SIMPAR_TUNE_MALLOC", "1") not in ("0", "false", "False"):
        tune_malloc()
