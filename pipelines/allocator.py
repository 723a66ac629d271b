"""Keep freed memory inside the process while training on CPU.

Every training step allocates its activations, logits and gradients afresh. glibc hands large blocks (mmap'd, from
128 KiB up) back to the kernel as soon as they are freed and trims the top of the heap, so the next step has the
kernel fault in and zero every page again: a visible share of a small model's step on CPU, largest for models whose
loss materialises fp32 (tokens, vocab) logits (`bench/model_throughput.py --system-malloc` measures it). PyTorch's
CPU tuning guide suggests swapping in jemalloc or tcmalloc (LD_PRELOAD); glibc can do the part that matters here
itself: serve large blocks from the heap (``M_MMAP_MAX = 0``) and never trim it (``M_TRIM_THRESHOLD``), so a step
reuses the pages the last one touched. The price is that the process keeps its peak heap until it exits, which a
training process does anyway. CUDA memory has its own caching allocator and is not affected.
"""

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
NEVER_TRIM = 2**31 - 1  # bytes of free heap top before trimming; mallopt takes an int


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse. False where that is not possible (not Linux glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
