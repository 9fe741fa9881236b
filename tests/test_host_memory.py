"""host_memory.release(): freed heap pages go back to the OS; a no-op without glibc."""

import ctypes
import sys

import pytest

from diffusion_jax import host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or not host_memory._libc(),
                    reason="needs Linux with glibc's malloc_trim")
def test_release_returns_freed_heap_pages_to_the_os():
  libc = host_memory._libc()
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  chunk, n = 64 * 1024, 3072  # 192 MiB in chunks below glibc's mmap threshold: they live in the heap
  ptrs = [libc.malloc(chunk) for _ in range(n)]
  assert all(ptrs)
  for p in ptrs:
    ctypes.memset(p, 1, chunk)  # resident
  keep = ptrs[-1]  # held at the top of the heap, so free() alone cannot shrink it
  for p in ptrs[:-1]:
    libc.free(p)
  before = host_memory.resident_bytes()
  released = host_memory.release()
  after = host_memory.resident_bytes()
  libc.free(keep)
  assert released is not None and released > 128 * 2 ** 20, released
  assert before - after > 128 * 2 ** 20, (before, after)


def test_release_is_a_no_op_without_malloc_trim(monkeypatch):
  monkeypatch.setattr(host_memory, "_LIBC", False)
  assert host_memory.release() is None
