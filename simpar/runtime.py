"""Process-level settings that make every simulated device use the machine well.

**BLAS threads: one per simulated device.**  OpenBLAS starts a thread per core
for every matrix product.  For the small matrices of simpar's models that is
slower even for a single device (a 60-step reference run: 2.1 s with one
thread, 2.2-30 s with two on the 2-core development machine, the spread being
other jobs sharing the cores), and with several devices on a machine the
threads fight over the cores (``python -m simpar train``: 36 s against 10 s).
So simpar chooses: while a threads world runs (:func:`simpar.launch`), the
process uses one BLAS thread, and each of its device threads calls BLAS on
its own core; under ``mpiexec`` with more than one rank every rank (one
device) uses one.  OpenBLAS's thread count is a property of the process, not
of a thread (``threadpoolctl`` sets it process-wide), which is why the limit
is held for the whole world and released when the last world ends.
An explicit setting always wins: with ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the environment simpar
leaves BLAS alone (:func:`user_blas_threads`).

**Allocator.** A training step allocates and frees about a gigabyte of arrays.
With glibc's default thresholds, large freed blocks go straight back to the
kernel, so the next step pays the page faults again (measured: ~15 % of a
reference GPT step, and 2-3x the time of a fresh 1 MiB all-reduce output).
:func:`tune_malloc` raises the thresholds so freed memory is kept for reuse.
``import simpar`` calls it once; set ``SIMPAR_TUNE_MALLOC=0`` to keep glibc's
defaults.  On non-glibc systems it does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False

BLAS_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_blas_lock = threading.Lock()
_blas_worlds = 0                 # threads worlds running now (launch may nest or overlap)
_blas_saved = None               # threadpoolctl's limiter: restores the original counts


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


def user_blas_threads() -> str | None:
    """The user's own BLAS thread setting (``"OMP_NUM_THREADS=4"``), or None."""
    for var in BLAS_VARIABLES:
        if os.environ.get(var, "").strip():
            return f"{var}={os.environ[var].strip()}"
    return None


def blas_threads() -> int | None:
    """The number of threads BLAS uses now in this process (None: no BLAS found
    or ``threadpoolctl`` missing)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:                                    # pragma: no cover
        return None
    counts = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    return max(counts) if counts else None


@contextlib.contextmanager
def one_blas_thread_per_device() -> Iterator[None]:
    """While the block runs, BLAS uses one thread in this process (unless the
    user chose a number, see :func:`user_blas_threads`); the original count
    comes back when the last such block ends."""
    global _blas_worlds, _blas_saved
    if user_blas_threads() is not None:
        yield
        return
    with _blas_lock:
        if _blas_worlds == 0:
            _blas_saved = _limit_blas(1)
        _blas_worlds += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_worlds -= 1
            if _blas_worlds == 0 and _blas_saved is not None:
                _blas_saved.restore_original_limits()
                _blas_saved = None


def _limit_blas(n: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                                    # pragma: no cover
        return None
    return threadpool_limits(n, user_api="blas")


def apply_defaults() -> None:
    """Called by ``import simpar``: the allocator thresholds, and one BLAS thread
    per rank when ``mpiexec`` started several ranks (each rank is a device)."""
    if os.environ.get("SIMPAR_TUNE_MALLOC", "1") not in ("0", "false", "False"):
        tune_malloc()
    from .comm import launcher_size
    if launcher_size() > 1 and user_blas_threads() is None:
        _limit_blas(1)               # for the life of the rank: never restored
