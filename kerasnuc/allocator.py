"""glibc allocator settings for long jobs that free large arrays (the server, slide prediction).

glibc's mmap threshold rises with every large free (up to 32 MB); after that, image tensors
and block arrays stay in fragmented per-thread arenas and the process keeps its high-water
mark. Giving allocations of at least 1 MiB their own mmap returns them to the OS when freed;
``malloc_trim`` hands back heap pages freed meanwhile. Elsewhere (musl, macOS) both are no-ops.
"""

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc malloc.h
DEFAULT_MMAP_THRESHOLD = 1 << 20  # bytes; serving.server and kerasnuc.predict both use 1 MiB


def libc():
    """glibc, or None where it is not the allocator."""
    try:
        library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return library if hasattr(library, "malloc_trim") and hasattr(library, "mallopt") else None


def mmap_large_allocations(threshold=DEFAULT_MMAP_THRESHOLD):
    """Allocations of at least ``threshold`` bytes get their own mmap. True if applied."""
    library = libc()
    if library is None or threshold <= 0:
        return False
    return bool(library.mallopt(M_MMAP_THRESHOLD, int(threshold)))


def trim():
    """Return freed heap pages to the OS (glibc ``malloc_trim(0)``); False where unavailable."""
    library = libc()
    if library is None:
        return False
    library.malloc_trim(ctypes.c_size_t(0))
    return True
