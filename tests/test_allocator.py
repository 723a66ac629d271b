"""quill.allocator: with it, a freed large block is reused without the kernel faulting its pages in again."""

import platform
import subprocess
import sys
import textwrap

import pytest

# A fresh interpreter (mallopt is process-wide) that mallocs, touches and frees 64 MiB three times and prints the
# minor page faults of each round. ctypes only: torch's worker threads would blur the count.
ROUNDS = textwrap.dedent("""
    import ctypes, resource, sys
    from quill.allocator import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults_per_round(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True).stdout
    return [int(line) for line in out.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_reuses_pages_instead_of_faulting_them_in_again():
    pages = (64 << 20) // 4096
    stock = faults_per_round("system")
    kept = faults_per_round("keep")
    assert all(n >= pages // 2 for n in stock), stock  # glibc unmaps a freed 64 MiB block: every round faults
    assert kept[0] >= pages // 2 and max(kept[1:]) < pages // 100, kept  # first touch only
