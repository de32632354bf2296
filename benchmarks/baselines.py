"""The PyTorch paths users have today, on the same inputs as ours, plus timing helpers.

* transformers' sliding chunks (``LongformerSelfAttention._sliding_chunks_*``), which need
  ``N`` to be a multiple of ``2w`` (the model pads to it);
* dense SDPA with the band as a boolean mask (whole attention; N x N memory);
* FlexAttention with a sliding-window block mask, compiled (whole attention; CPU where torch has it);
* allenai/longformer's formulation compiled by TVM (the "naive" schedule).
"""

from __future__ import annotations

import functools
import time

import torch

from .memory import reset_peak_rss, status_kib


def load_compiled(module, path):
    """A CPU module compiled now, exported to ``path`` and loaded with its kernels on the threads
    the shipped libraries' kernels run on (``tvm_kernels`` takes only the runtime's contract, so
    this lives with the tools that time such libraries beside the shipped ones)."""
    import tvm_ffi

    from longformer_tvm import _threads
    from tvm_kernels.cpu import build

    build.export_cpu(module, path)
    loaded = tvm_ffi.load_module(str(path))
    _threads.install(path)
    return loaded


def flops_band(b: int, n: int, h: int, d: int, c: int) -> float:
    """Useful FLOPs of one band product (QK or PV): 2 * B * N * H * C * D."""
    return 2.0 * b * n * h * c * d


def timeit(fn, *, min_time: float = 0.5, warmup: int = 1, max_iters: int = 50) -> float:
    """Best seconds per call over at least ``min_time`` seconds (after ``warmup`` calls).

    The best, not the median: on a shared 2-core machine other processes only ever add time, and
    the fastest run is the one they disturbed least -- for ours and the baselines alike.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sgemm_gflops(n: int = 2048, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    secs = timeit(lambda: a @ b, min_time=0.5)
    return 2.0 * n ** 3 / secs / 1e9


@functools.lru_cache(maxsize=None)
def _hf_layer(w: int, heads: int, head_dim: int):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    cfg = LongformerConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                           attention_window=[2 * w], attention_probs_dropout_prob=0.0)
    return LongformerSelfAttention(cfg, layer_id=0).eval()


def hf_qk(q: torch.Tensor, k: torch.Tensor, w: int) -> torch.Tensor:
    """transformers' banded scores, shape (B, N, H, 2w+1). Needs N % (2w) == 0."""
    return _hf_layer(w, q.shape[2], q.shape[3])._sliding_chunks_query_key_matmul(q, k, w)


def hf_pv(p: torch.Tensor, v: torch.Tensor, w: int) -> torch.Tensor:
    return _hf_layer(w, v.shape[2], v.shape[3])._sliding_chunks_matmul_attn_probs_value(p, v, w)


def hf_attention(q, k, v, w):
    """transformers' attention core: chunked QK, mask of invalid locations, softmax, chunked PV."""
    s = hf_qk(q, k, w)
    return hf_pv(torch.softmax(s, dim=-1), v, w)


def ours_attention(q, k, v, w):
    """Ours unfused: band scores, softmax, band PV (the (B, N, H, C) scores in memory)."""
    import longformer_tvm as lt

    s = lt.sliding_window_qk(q, k, w, padding_value=float("-inf"))
    return lt.sliding_window_pv(torch.softmax(s, dim=-1), v, w)


def ours_fused_attention(q, k, v, w):
    """Ours fused: sliding_window_attention (one kernel where the library has it)."""
    import longformer_tvm as lt

    return lt.sliding_window_attention(q, k, v, w, scale=1.0)


def fused_served() -> bool:
    from longformer_tvm import _fused

    return _fused.served("cpu", torch.float32)


def peak_extra_mib(fn) -> float | None:
    """Resident memory (MiB) one call of ``fn`` adds at its peak over the RSS before it (Linux:
    VmHWM after resetting it through /proc/self/clear_refs); None where that cannot be read.

    Memory that an allocator kept from an earlier call is not counted again: call it after the
    timings, as the benchmarks do, for the working memory of a warm call."""
    before = status_kib("VmRSS")
    if not reset_peak_rss():
        return None
    fn()
    peak = status_kib("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0) / 1024


@functools.lru_cache(maxsize=4)
def _band_mask(n: int, w: int) -> torch.Tensor:
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= w


def sdpa_attention(q, k, v, w):
    """Dense SDPA under the band mask; (B, N, H, D) in and out. Memory O(N^2)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=_band_mask(q.shape[1], w),
        scale=1.0)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=4)
def _flex(n: int, w: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= w

    mask = create_block_mask(band, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu")
    return torch.compile(flex_attention, dynamic=False), mask


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_attention(q, k, v, w):
    fn, mask = _flex(q.shape[1], w)
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, scale=1.0)
    return out.transpose(1, 2)
