"""Recycled memory for the large CPU outputs of the band products.

A band output is large (the QK scores at B=1, N=4096, H=12, w=256 are 100 MB) and short-lived: a
Longformer layer turns it into probabilities and drops it. Fresh memory from the OS is zeroed by
the kernel page by page on first touch, and at that size the zeroing costs a third of the QK
product (about 10 of 31 ms here, with transparent huge pages already requested). So, as
PyTorch's CUDA caching allocator does for GPU memory, outputs of at least :data:`MIN_BYTES` come
from blocks that earlier outputs gave back:

* A block goes back to the pool when the last tensor (or view) on its memory is freed -- never
  while anything can still read it (autograd's saved tensors included).
* At most ``LONGFORMER_TVM_POOL_MB`` MiB of idle blocks are kept (default 1024, read when the
  package is imported; ``0`` turns reuse off, so every output is fresh memory). A block past the
  limit goes back to the OS at once. :func:`empty_cache` returns every idle block now.
* Blocks are anonymous memory maps with transparent huge pages requested; a block serves requests
  that round up to the same number of 2 MiB pages.

The cost is the usual one of a caching allocator: idle blocks count in the process's resident
memory until they are reused or released.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import threading
import weakref

import numpy as np
import torch

logger = logging.getLogger("longformer_tvm")

#: Outputs smaller than this are plain ``torch.empty`` (faulting them in is cheap).
MIN_BYTES = 8 << 20
_BLOCK_ROUND = 2 << 20  # blocks are whole 2 MiB (huge) pages
_DEFAULT_LIMIT_MB = 1024
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
_ENV = "LONGFORMER_TVM_POOL_MB"


def _limit_from_env() -> int:
    raw = os.environ.get(_ENV)
    if raw is None or raw.strip() == "":
        return _DEFAULT_LIMIT_MB << 20
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if mb < 0:
        logger.warning("%s=%r is not a whole number of MiB >= 0; using the default %d",
                       _ENV, raw, _DEFAULT_LIMIT_MB)
        return _DEFAULT_LIMIT_MB << 20
    return mb << 20


class OutputPool:
    """Idle memory blocks by size; see the module docstring."""

    def __init__(self, limit_bytes: int | None = None):
        #: Most bytes kept in idle blocks (``LONGFORMER_TVM_POOL_MB`` unless given).
        self.limit_bytes = _limit_from_env() if limit_bytes is None else limit_bytes
        self._free: dict[int, list[mmap.mmap]] = {}
        self._idle = 0
        # Blocks come back from whichever thread frees the last tensor on them, possibly from a
        # garbage collection that runs while this thread holds the lock: hence re-entrant.
        self._lock = threading.RLock()

    @property
    def idle_bytes(self) -> int:
        """Bytes held in idle blocks."""
        return self._idle

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialised contiguous CPU tensor on a block (an idle one if there is one of the
        size, else a new one on huge pages), or None where the pool does not serve the request
        (smaller than :data:`MIN_BYTES`, or a dtype numpy lacks)."""
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if np_dtype is None:
            return None
        numel = math.prod(shape)
        nbytes = numel * np.dtype(np_dtype).itemsize
        if nbytes < MIN_BYTES:
            return None
        size = -(-nbytes // _BLOCK_ROUND) * _BLOCK_ROUND
        with self._lock:
            blocks = self._free.get(size)
            block = blocks.pop() if blocks else None
            if block is not None:
                self._idle -= size
        if block is None:
            # private: Python's default for anonymous maps is shared memory, which the kernel
            # backs with huge pages only where shmem THP is enabled (rarely), and forks would share
            block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            try:
                block.madvise(mmap.MADV_HUGEPAGE)
            except (AttributeError, OSError):  # not Linux, or THP unavailable: only a hint
                pass
        array = np.frombuffer(block, dtype=np_dtype, count=numel).reshape(shape)
        # torch keeps ``array`` alive for as long as any tensor uses its storage; when the last
        # one goes, ``array`` is freed and the block comes back here. (Shaped in numpy, so the
        # tensor is a base tensor, not a torch view: autograd lets callers modify it in place.)
        weakref.finalize(array, self._give_back, size, block)
        return torch.from_numpy(array)

    def _give_back(self, size: int, block: mmap.mmap) -> None:
        with self._lock:
            if self._idle + size <= self.limit_bytes:
                self._free.setdefault(size, []).append(block)
                self._idle += size
        # else: dropping the last reference unmaps the block

    def clear(self) -> None:
        """Return every idle block to the OS."""
        with self._lock:
            self._free.clear()
            self._idle = 0


POOL = OutputPool()


def empty_cache() -> None:
    """Release the idle output memory that ``longformer_tvm`` keeps for reuse (like
    ``torch.cuda.empty_cache``). Outputs still in use are not affected."""
    POOL.clear()


def _after_fork_in_child() -> None:
    # a lock that another thread held at fork time would never be released in the child
    POOL._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
