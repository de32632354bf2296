"""GPU timings of the band products beside the PyTorch paths people use today, in one run.

At B=1, N=4096, H=12, D=64, w=256 (the paper's setting) per dtype:

* ``qk`` / ``pv``: our CUDA kernels vs transformers' sliding chunks
  (``LongformerSelfAttention._sliding_chunks_*``, which need N % 2w == 0);
* ``attention`` (QK, softmax, PV): ours and transformers' vs dense SDPA under the band mask and
  FlexAttention with a sliding-window block mask (compiled);
* the device-to-device copy bandwidth, to read the products' bandwidth against.

Timed with CUDA events: the median of ``iters`` calls after warm-up. FLOPs count only the band
(2*B*N*H*C*D per product); bytes count each operand read once and the output written once.
``python -m benchmarks.cuda_bench [--json out.json]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys

import torch

logger = logging.getLogger("cuda_bench")

SHAPE = dict(b=1, n=4096, h=12, d=64, w=256)


def cuda_time(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds per call, timed with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(gib: float = 1.0) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written."""
    n = int(gib * (1 << 30)) // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), iters=10)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def _hf_layer(w: int, heads: int, head_dim: int):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    cfg = LongformerConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                           attention_window=[2 * w], attention_probs_dropout_prob=0.0)
    return LongformerSelfAttention(cfg, layer_id=0).eval()


def hf_qk(q, k, w):
    return _hf_layer(w, q.shape[2], q.shape[3])._sliding_chunks_query_key_matmul(q, k, w)


def hf_pv(p, v, w):
    return _hf_layer(w, v.shape[2], v.shape[3])._sliding_chunks_matmul_attn_probs_value(p, v, w)


def ours_qk(q, k, w):
    import longformer_tvm as lt

    return lt.sliding_window_qk(q, k, w, padding_value=float("-inf"))


def ours_pv(p, v, w):
    import longformer_tvm as lt

    return lt.sliding_window_pv(p, v, w)


@functools.lru_cache(maxsize=4)
def _band_mask(n: int, w: int, device: str) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return (i[:, None] - i[None, :]).abs() <= w


def sdpa_attention(q, k, v, w):
    mask = _band_mask(q.shape[1], w, str(q.device))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=1.0)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=4)
def _flex(n: int, w: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= w

    mask = create_block_mask(band, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)
    return torch.compile(flex_attention, dynamic=False), mask


def flex_attention(q, k, v, w):
    fn, mask = _flex(q.shape[1], w, str(q.device))
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, scale=1.0)
    return out.transpose(1, 2)


def _attention(qk, pv):
    def run(q, k, v, w):
        return pv(torch.softmax(qk(q, k, w), dim=-1), v, w)

    return run


def run(dtypes=("float32", "float16"), shape=None, iters: int = 20) -> list[dict]:
    """One row per (dtype, operation, implementation): ms, GFLOP/s, GB/s and ratio to ours."""
    s = dict(SHAPE, **(shape or {}))
    b, n, h, d, w = s["b"], s["n"], s["h"], s["d"], s["w"]
    c = 2 * w + 1
    rows = []
    for name in dtypes:
        dtype = getattr(torch, name)
        el = torch.finfo(dtype).bits // 8
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
        p = torch.softmax(torch.randn(b, n, h, c, device="cuda", dtype=torch.float32, generator=g), -1).to(dtype)
        flops = 2.0 * b * n * h * c * d
        ops = {
            "qk": (flops, (2 * b * n * h * d + b * n * h * c) * el, (q, k),
                   {"ours": ours_qk, "hf sliding chunks": hf_qk}),
            "pv": (flops, (2 * b * n * h * d + b * n * h * c) * el, (p, v),
                   {"ours": ours_pv, "hf sliding chunks": hf_pv}),
            "attention": (2 * flops, (4 * b * n * h * d) * el, (q, k, v),
                          {"ours": _attention(ours_qk, ours_pv), "hf sliding chunks": _attention(hf_qk, hf_pv),
                           "dense SDPA (band mask)": sdpa_attention, "FlexAttention": flex_attention}),
        }
        for op, (fl, nbytes, args, impls) in ops.items():
            base = None
            for impl, fn in impls.items():
                row = {"dtype": name, "op": op, "impl": impl, **s}
                try:
                    ms = cuda_time(lambda fn=fn: fn(*args, w), iters=iters)
                except Exception as exc:  # a baseline that cannot run here is reported, not fatal
                    row.update(ms=None, error=f"{type(exc).__name__}: {str(exc)[:160]}")
                    rows.append(row)
                    continue
                base = ms if impl == "ours" else base
                row.update(ms=ms, gflops=fl / (ms * 1e-3) / 1e9, gbps=nbytes / (ms * 1e-3) / 1e9,
                           ours_speedup=(ms / base) if base else None)
                rows.append(row)
    return rows


def format_table(rows: list[dict], copy_gbps: float | None = None) -> str:
    lines = [f"{'dtype':9s} {'op':10s} {'implementation':24s} {'ms':>9s} {'GFLOP/s':>9s} {'GB/s':>8s} "
             f"{'ours x faster':>13s}"]
    for r in rows:
        if r.get("ms") is None:
            lines.append(f"{r['dtype']:9s} {r['op']:10s} {r['impl']:24s} {'failed':>9s}  {r.get('error', '')}")
            continue
        speed = "" if r["impl"] == "ours" or not r.get("ours_speedup") else f"{r['ours_speedup']:.2f}"
        lines.append(f"{r['dtype']:9s} {r['op']:10s} {r['impl']:24s} {r['ms']:9.3f} {r['gflops']:9.0f} "
                     f"{r['gbps']:8.0f} {speed:>13s}")
    if copy_gbps:
        lines.append(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    return "\n".join(lines)


def markdown(rows: list[dict], copy_gbps: float, device: str) -> str:
    """A section for benchmarks/RESULTS.md."""
    s = SHAPE
    lines = [f"### CUDA: {device} (torch {torch.__version__})", "",
             f"B={s['b']} N={s['n']} H={s['h']} D={s['d']} w={s['w']}; median of CUDA-event timings. "
             f"Device-to-device copy: {copy_gbps:.0f} GB/s (read + write).", "",
             "| dtype | op | implementation | ms | GFLOP/s | GB/s | ours x faster |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("ms") is None:
            lines.append(f"| {r['dtype']} | {r['op']} | {r['impl']} | failed | | | |")
            continue
        speed = "" if r["impl"] == "ours" or not r.get("ours_speedup") else f"{r['ours_speedup']:.2f}"
        lines.append(f"| {r['dtype']} | {r['op']} | {r['impl']} | {r['ms']:.3f} | {r['gflops']:.0f} | "
                     f"{r['gbps']:.0f} | {speed} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="", help="write a section for benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time")
        return 1
    rows = run(tuple(args.dtypes.split(",")), iters=args.iters)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} (torch {torch.__version__})")
    print(format_table(rows, bw))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(rows, bw, torch.cuda.get_device_name()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "copy_gbps": bw, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
