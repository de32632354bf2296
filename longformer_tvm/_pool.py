"""Recycled memory for the large CPU outputs of the band products.

A band output is large (the QK scores at B=1, N=4096, H=12, w=256 are 100 MB) and short-lived: a
Longformer layer turns it into probabilities and drops it. Fresh memory from the OS is zeroed by
the kernel page by page on first touch, and at that size the zeroing costs a third of the QK
product (about 10 of 31 ms here, with transparent huge pages already requested). So, as
PyTorch's CUDA caching allocator does for GPU memory, outputs of at least :data:`MIN_BYTES` come
from blocks that earlier outputs no longer use:

* A block is a torch storage, rounded up to whole 2 MiB pages, with transparent huge pages
  requested; a block serves requests that round up to its size. A pooled output is an ordinary
  tensor on it: it can be resized, or grow as an ``out=`` argument (a resize past the block moves
  the tensor to new memory, and the block leaves the pool).
* A block is reused only once the pool holds the last reference to it -- no tensor, view, storage
  object or tensor autograd saved uses it any more (torch's own reference count says so).
* At most ``LONGFORMER_TVM_POOL_MB`` MiB of idle blocks are kept (default 1024, read when the
  package is imported; ``0`` turns reuse off, so every output is fresh memory). The pool looks
  for idle blocks when it hands out an output, and then returns those past the limit to the OS;
  :func:`empty_cache` returns every idle block now. (An output freed past the limit goes back to
  the OS at the next large output or ``empty_cache()``, not at once.)
* A block that left the pool's hands -- resized, moved to shared memory (``share_memory_()``,
  a DataLoader worker's result), or marked unresizable (``Tensor.numpy()`` does that) -- is
  forgotten, never handed out again.

The cost is the usual one of a caching allocator: idle blocks count in the process's resident
memory until they are reused or released.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import sys
import threading

import torch

from . import _install

logger = logging.getLogger("longformer_tvm")

#: Outputs smaller than this are plain ``torch.empty`` (faulting them in is cheap).
MIN_BYTES = 8 << 20
_BLOCK_ROUND = 2 << 20  # blocks are whole 2 MiB (huge) pages
_PAGE = mmap.PAGESIZE
# torch's count of references to a storage; without it nothing can tell an idle block from a used
# one, and the pool stays off
_use_count = getattr(torch._C, "_storage_Use_Count", None)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _limit_from_env() -> int:
    try:
        return _install.pool_limit_mb() << 20
    except ValueError as exc:
        logger.warning("%s; using the default %d", exc, _install.DEFAULT_POOL_MB)
        return _install.DEFAULT_POOL_MB << 20


def _advise_huge_pages(ptr: int, size: int) -> None:
    """Ask for transparent huge pages on the whole pages of [ptr, ptr + size): only a hint."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if _LIBC is None or advice is None:
        return
    start, end = -(-ptr // _PAGE) * _PAGE, (ptr + size) // _PAGE * _PAGE
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


class _Block:
    __slots__ = ("storage", "ptr", "size")

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.storage, self.ptr, self.size = storage, storage.data_ptr(), storage.nbytes()

    def intact(self) -> bool:
        """Still the memory the pool allocated, at its size, resizable."""
        s = self.storage
        return s.data_ptr() == self.ptr and s.nbytes() == self.size and s.resizable()

    def idle(self) -> bool:
        return _use_count(self.storage._cdata) == 1  # the pool's own reference only


class OutputPool:
    """Blocks by size, in use or idle; see the module docstring."""

    def __init__(self, limit_bytes: int | None = None):
        #: Most bytes kept in idle blocks (``LONGFORMER_TVM_POOL_MB`` unless given).
        self.limit_bytes = _limit_from_env() if limit_bytes is None else limit_bytes
        self._blocks: dict[int, list[_Block]] = {}
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        """Bytes held in idle blocks (after returning those past the limit)."""
        with self._lock:
            return self._sweep(None)[1]

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialised contiguous CPU tensor on a block (an idle one of the size if there is
        one, else a new one), or None where the pool does not serve the request (smaller than
        :data:`MIN_BYTES`, or the pool is off)."""
        if self.limit_bytes <= 0 or _use_count is None:
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES:
            return None
        size = -(-nbytes // _BLOCK_ROUND) * _BLOCK_ROUND
        with self._lock:  # until the tensor holds the block, so no other thread takes it too
            block = self._sweep(size)[0]
            if block is None:
                block = _Block(torch.UntypedStorage(size, device="cpu"))  # no page touched yet
                _advise_huge_pages(block.ptr, size)
                self._blocks.setdefault(size, []).append(block)
            return torch.empty(0, dtype=dtype, device="cpu").set_(block.storage, 0, tuple(shape))

    def _sweep(self, want: int | None) -> tuple[_Block | None, int]:
        """Forget blocks that left the pool, return idle ones past the limit to the OS, and take
        an idle block of ``want`` bytes if there is one. Returns it and the idle bytes kept."""
        taken, idle = None, 0
        for size in list(self._blocks):
            kept = []
            for block in self._blocks[size]:
                if not block.intact():
                    continue  # forgotten: whoever uses it keeps it alive
                if block.idle():
                    if taken is None and size == want:
                        taken = block
                    elif idle + size <= self.limit_bytes:
                        idle += size
                    else:
                        continue  # dropping the pool's reference frees it
                kept.append(block)
            if kept:
                self._blocks[size] = kept
            else:
                del self._blocks[size]
        return taken, idle

    def clear(self) -> None:
        """Return every idle block to the OS (blocks in use come back to the pool when freed)."""
        with self._lock:
            for size in list(self._blocks):
                kept = [b for b in self._blocks[size] if b.intact() and not b.idle()]
                if kept:
                    self._blocks[size] = kept
                else:
                    del self._blocks[size]


POOL = OutputPool()


def empty_cache() -> None:
    """Release the idle output memory that ``longformer_tvm`` keeps for reuse (like
    ``torch.cuda.empty_cache``). Outputs still in use are not affected."""
    POOL.clear()


def _after_fork_in_child() -> None:
    # a lock that another thread held at fork time would never be released in the child
    POOL._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
