"""Argument normalisation for the band products: one checker, used by every entry point.

The band is described once, by :class:`Band`: for query row ``i`` and diagonal ``j`` the key row is
``i + (j - left) * dilation[h]``; columns ``j`` run over ``0 .. left + right``. A symmetric window
``w`` is ``left = right = w``; an autoregressive (one-sided) window is ``left = w, right = 0``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

import numpy as np
import torch

#: Dtypes the products are defined for (the compiled libraries cover a subset per device).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Window and dilation travel as int64 (op schema, kernel arguments) and C = 2 * window + 1 must
#: fit one too. Any dilation past the sequence length gives the same band as N.
MAX_WINDOW = (2**63 - 2) // 2
MAX_DILATION = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class Band:
    """A normalised band: window extents and one dilation per head."""

    left: int
    right: int
    dilation: tuple[int, ...]

    @property
    def columns(self) -> int:
        """Number of diagonals C (the last dimension of a banded tensor)."""
        return self.left + self.right + 1

    @property
    def autoregressive(self) -> bool:
        return self.right == 0

    def head_runs(self) -> list[tuple[int, int, int]]:
        """Maximal runs of consecutive heads with equal dilation: ``[(h0, h1, d), ...]``."""
        runs: list[tuple[int, int, int]] = []
        start = 0
        for h in range(1, len(self.dilation) + 1):
            if h == len(self.dilation) or self.dilation[h] != self.dilation[start]:
                runs.append((start, h, self.dilation[start]))
                start = h
        return runs


def _as_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value.item())
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
            return int(value)
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} ({name}={value!r})")
    return int(value)


def _integer_array(op: str, dilation, heads: int) -> tuple[int, ...]:
    """A torch tensor or numpy array of dilations: 0-D (every head) or 1-D (one per head)."""
    kind = "tensor" if isinstance(dilation, torch.Tensor) else "numpy array"
    integral = (not (dilation.is_floating_point() or dilation.is_complex() or dilation.dtype == torch.bool)
                if kind == "tensor" else dilation.dtype.kind in "iu")
    if not integral:
        raise TypeError(f"{op}: dilation must hold integers, got a {kind} of dtype {dilation.dtype}")
    if dilation.ndim == 0:
        return (int(dilation.item()),) * heads
    if dilation.ndim != 1:
        raise ValueError(f"{op}: dilation must be an int or a 1-D {kind} of length heads={heads}, "
                         f"got a {kind} of shape {tuple(dilation.shape)}")
    dils = tuple(int(x) for x in dilation.tolist())
    if len(dils) != heads:
        raise ValueError(f"{op}: dilation must have one entry per head: got {len(dils)} entries "
                         f"for heads={heads}")
    return dils


def normalize_band(op: str, window, dilation, autoregressive: bool, heads: int) -> Band:
    """Check ``window``/``dilation``/``autoregressive`` and return the :class:`Band` they describe.

    ``dilation`` is an int (all heads; numpy integers count), or one int per head: a length-``heads``
    sequence, 1-D integer tensor or 1-D integer numpy array.
    """
    w = _as_int(op, "window", window)
    if w < 0:
        raise ValueError(f"{op}: window must be >= 0 (the number of diagonals on each side), got {w=}")
    if w > MAX_WINDOW:
        raise ValueError(f"{op}: window must be <= {MAX_WINDOW} (C = 2*window + 1 columns must fit "
                         f"in int64), got {w=}")
    if not isinstance(autoregressive, bool):
        raise TypeError(f"{op}: autoregressive must be a bool, got {autoregressive!r}")
    if isinstance(dilation, (torch.Tensor, np.ndarray)):
        dils = _integer_array(op, dilation, heads)
    elif isinstance(dilation, Sequence) and not isinstance(dilation, (str, bytes)):
        dils = tuple(_as_int(op, "dilation[i]", x) for x in dilation)
        if len(dils) != heads:
            raise ValueError(f"{op}: dilation must have one entry per head: got {len(dils)} entries "
                             f"for heads={heads}")
    else:
        dils = (_as_int(op, "dilation", dilation),) * heads
    bad = [d for d in dils if d < 1]
    if bad:
        raise ValueError(f"{op}: dilation must be >= 1 for every head, got dilation={list(dils)}")
    if any(d > MAX_DILATION for d in dils):
        raise ValueError(f"{op}: dilation must be <= {MAX_DILATION} (int64; any dilation >= seq_len "
                         f"gives the same band as seq_len), got dilation={list(dils)}")
    return Band(left=w, right=0 if autoregressive else w, dilation=dils)


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {name}.layout={t.layout}; "
                        f"convert it with {name}.to_dense()")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must have 4 dimensions (batch, seq_len, heads, X), "
                         f"got {name}.shape={tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), "
                        f"got {name}.dtype={t.dtype}")


def check_pair(op: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor, last_equal: bool) -> None:
    """Rank, dtype, device and leading-dimension agreement of two operands."""
    n1, n2 = names
    check_tensor(op, n1, a)
    check_tensor(op, n2, b)
    # under torch.autocast("cuda") the ops cast both operands to the autocast dtype
    autocast = a.is_cuda and torch.is_autocast_enabled("cuda")
    if a.dtype != b.dtype and not autocast:
        raise TypeError(f"{op}: {n1} and {n2} must have the same dtype, got {n1}.dtype={a.dtype}, "
                        f"{n2}.dtype={b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{op}: {n1} and {n2} must be on the same device, got {a.device} and {b.device}")
    if a.shape[:3] != b.shape[:3]:
        raise ValueError(f"{op}: {n1} and {n2} must agree in (batch, seq_len, heads), got "
                         f"{n1}.shape={tuple(a.shape)}, {n2}.shape={tuple(b.shape)}")
    if last_equal and a.shape[3] != b.shape[3]:
        raise ValueError(f"{op}: {n1} and {n2} must have the same last dimension (head size), got "
                         f"{n1}.shape={tuple(a.shape)}, {n2}.shape={tuple(b.shape)}")


def check_banded(op: str, name: str, t: torch.Tensor, band: Band) -> None:
    if t.shape[3] != band.columns:
        kind = "w+1 (autoregressive)" if band.autoregressive else "2*w+1"
        raise ValueError(f"{op}: {name} is banded and must have C={band.columns} columns ({kind} for "
                         f"window={band.left}), got {name}.shape={tuple(t.shape)}")
