"""Process tuning for steady latency: glibc's allocator and BLAS threads.

Measured on the 32-coil, 256x256, 10-slice scan at scanner pace (2 cores, server in its
own process, warm-up scan excluded; ``bench/latency.py``): with glibc's defaults FFTs of
the first slices of every scan took 35-50 ms instead of 8-10 ms, all of it CPU time in
page faults, because each worker thread allocates from its own arena and freed 16 MB
k-space buffers go back to the kernel (munmap / heap trim), so the next buffer faults its
pages in again. One arena, no mmap below 256 MiB and no trimming below 1 GiB keep the
faulted pages in the process: image latency after last readout went from p50 119 ms /
p99 183 ms to p50 16 ms / p99 29 ms. The first scan after server start still pays the
faults once. The cost is resident memory kept between scans.

BLAS is limited to one thread: each gadget runs in its own thread, and a readout-sized
product that OpenBLAS splits across threads waits for a busy core (8-16 ms measured
instead of 0.03 ms on 2 cores).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_done = False
_blas_limit = None


def tune_process(mmap_threshold_bytes: int = 256 * 2**20, trim_threshold_bytes: int = 2**30) -> bool:
    """Apply the allocator and BLAS settings once per process; returns True if glibc took them.

    A no-op (False) where the C library is not glibc.
    """
    global _done, _blas_limit
    if _done:
        return True
    _done = True
    if _blas_limit is None:
        try:
            import numpy.linalg  # noqa: F401  load both BLAS libraries before limiting them
            import scipy.linalg  # noqa: F401
            from threadpoolctl import threadpool_limits

            _blas_limit = threadpool_limits(limits=1, user_api="blas")
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            pass
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(
            libc.mallopt(param, value) == 1
            for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, mmap_threshold_bytes), (_M_TRIM_THRESHOLD, trim_threshold_bytes))
        )
    except (OSError, AttributeError):
        return False
    log.debug("glibc allocator tuned: %s", ok)
    return ok

