"""Give the heap pages that compilation freed back to the operating system (glibc's `malloc_trim`).

XLA's compiler allocates a few hundred MB of small objects while it compiles a large program (the SD-1.5 UNet
forward: ~0.4 GB on CPU) and frees them when it is done. glibc keeps freed heap memory in its arenas, and the
weights and run-time buffers that follow are large allocations served elsewhere (mmap), so that memory stays
in the process's resident set for the rest of its life and raises its peak: the measured SD-1.5 forward went
from 4.24 to 3.93 GiB peak RSS with one call after the compile (docs/speed.md). `release()` asks glibc to hand
back every free page; it frees nothing in use, costs milliseconds, and is a no-op where the C library is not
glibc (macOS, musl) or the call is unavailable.

Called after the train step is compiled (`train/trainer.py`) and by the benchmarks after their compiles.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

_LIBC = None


def _libc():
  global _LIBC
  if _LIBC is None:
    try:
      lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
      _LIBC = lib if hasattr(lib, "malloc_trim") else False
    except OSError:
      _LIBC = False
  return _LIBC


def resident_bytes() -> Optional[int]:
  """The process's current resident set in bytes (Linux `/proc/self/statm`), or None elsewhere."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


def release() -> Optional[int]:
  """Return freed heap pages to the OS. Bytes the resident set shrank by (None where unsupported)."""
  lib = _libc()
  if not lib:
    return None
  before = resident_bytes()
  lib.malloc_trim(ctypes.c_size_t(0))
  after = resident_bytes()
  return None if before is None or after is None else max(before - after, 0)
