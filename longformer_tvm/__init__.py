"""longformer-tvm: Longformer's sliding-window (diagonal-band) attention products as PyTorch ops.

The kernels are TVM-compiled ahead of time (``build_kernels.py``) and loaded through the TVM
runtime; importing this package never imports the TVM compiler and never fails because a binary
is missing -- that becomes an error at call time naming what to build (see :func:`backend_info`).
"""

from . import _install, backends, reference
from ._contract import __version__
from ._errors import KernelIntegrityError, KernelNotAvailableError
from ._pool import empty_cache
from .backends import backend_info
from .attention import AttentionOutput, LongformerSelfAttention
from .functional import (diagonaled_mm, sliding_window_attention, sliding_window_pv,
                         sliding_window_pv_transposed, sliding_window_qk)

# LONGFORMER_TVM_LOG_LEVEL, and a warning for a bad LONGFORMER_TVM_BACKEND (never an error here)
_install.apply_import_settings()

__all__ = [
    "diagonaled_mm",
    "sliding_window_attention",
    "sliding_window_qk",
    "sliding_window_pv",
    "sliding_window_pv_transposed",
    "LongformerSelfAttention",
    "AttentionOutput",
    "backend_info",
    "backends",
    "empty_cache",
    "reference",
    "KernelNotAvailableError",
    "KernelIntegrityError",
]
