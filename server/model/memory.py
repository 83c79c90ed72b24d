"""Memory the allocator holds free, given back to the operating system.

glibc keeps freed blocks for reuse, and the arrays of a shrunk state pool may have come from its
heap rather than from their own mappings (its mmap threshold rises as large blocks are freed), so
the resident memory of a server whose sessions have gone can stay near its peak. `malloc_trim`
hands every whole free page back, inside the heap as well as at its top. Elsewhere than glibc it
is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no C library by that name, or one without malloc_trim (musl, macOS)
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS: after a large free, such as a pool shrinking."""
    if _TRIM is not None:
        _TRIM(0)
