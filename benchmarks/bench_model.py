"""Whole-model benchmark: a base-size LongformerModel forward (or, with ``--train``, a training
step), transformers' attention vs ours.

Each configuration runs in its own subprocess (same random weights, same input), so its peak
resident memory is its own. Reported per configuration: median and best forward time, peak RSS
during the timed forwards, and that peak minus the RSS right after building the model (the
forward's working memory). Then the speed-up and memory ratio of ours over transformers'.

    python benchmarks/bench_model.py                      # 12 layers, 4096 tokens, batch 1
    python benchmarks/bench_model.py --layers 2 --repeat 1 --json out.json
    python benchmarks/bench_model.py --train --paired     # training steps, alternating in one process

The attention FLOPs counted are the band products' (2 * B * N * H * C * D each for qk and pv, plus
the global rows and columns); the projections and feed-forward layers are the same in both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from memory import reset_peak_rss, status_kib  # benchmarks/ is on sys.path when run as a script

IMPLS = ("transformers", "longformer_tvm")


def _model_and_inputs(args):
    import torch
    from transformers import LongformerConfig, LongformerModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = LongformerConfig(num_hidden_layers=args.layers, attention_window=args.attention_window,
                              max_position_embeddings=args.seq_len + 2,
                              attention_probs_dropout_prob=args.attention_dropout)
    model = LongformerModel(config, add_pooling_layer=False).train(args.train)
    n, bsz = args.seq_len, args.batch
    g = torch.Generator().manual_seed(args.seed)
    inputs = dict(input_ids=torch.randint(5, config.vocab_size, (bsz, n), generator=g),
                  attention_mask=torch.ones(bsz, n, dtype=torch.long),
                  global_attention_mask=torch.zeros(bsz, n, dtype=torch.long))
    inputs["global_attention_mask"][:, : args.globals] = 1
    short = {k: v[:, : min(n, 2 * args.attention_window)] for k, v in inputs.items()}
    return model, inputs, short


def _step(model, inputs: dict, train: bool) -> None:
    """One forward (inference mode), or with --train one training step: forward, then backward
    of the summed output (no optimizer: the same for both attentions)."""
    import torch

    if not train:
        with torch.inference_mode():
            model(**inputs)
        return
    model.zero_grad(set_to_none=True)
    model(**inputs).last_hidden_state.sum().backward()


def paired_worker(args) -> dict:
    """One process, one model: forwards alternate between the two attentions (time only)."""
    import torch

    from longformer_tvm.hf import restore_hf_attention, use_tvm_attention

    model, inputs, short = _model_and_inputs(args)
    times = {impl: [] for impl in IMPLS}
    for impl in IMPLS:
        (use_tvm_attention if impl == "longformer_tvm" else restore_hf_attention)(model)
        _step(model, short, args.train)
    for _ in range(args.warmup + args.repeat):
        for impl in IMPLS:
            (use_tvm_attention if impl == "longformer_tvm" else restore_hf_attention)(model)
            start = time.perf_counter()
            _step(model, inputs, args.train)
            times[impl].append(time.perf_counter() - start)
    times = {k: v[args.warmup:] for k, v in times.items()}
    ratios = [a / b for a, b in zip(times["transformers"], times["longformer_tvm"])]
    return dict(times=times, pair_ratios=ratios, median_ratio=statistics.median(ratios))


def worker(args) -> dict:
    import torch

    model, inputs, short = _model_and_inputs(args)
    info = {}
    if args.impl == "longformer_tvm":
        import longformer_tvm
        from longformer_tvm.hf import use_tvm_attention

        use_tvm_attention(model)
        info["backend"] = longformer_tvm.backend_info()["mode"]

    _step(model, short, args.train)  # loads kernels, warms the allocator; small: not the peak
    for _ in range(args.warmup):
        _step(model, inputs, args.train)
    model.zero_grad(set_to_none=True)
    baseline = status_kib("VmRSS")
    reset = reset_peak_rss()
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        _step(model, inputs, args.train)
        times.append(time.perf_counter() - start)
    peak = status_kib("VmHWM") if reset else None
    if peak is None:  # no /proc: the lifetime peak, model build included
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.impl == "longformer_tvm":
        import longformer_tvm

        info["loaded"] = longformer_tvm.backend_info()["loaded"]
    return dict(impl=args.impl, times=times, median_s=statistics.median(times), best_s=min(times),
                rss_after_build_mib=(baseline or 0) / 1024, peak_rss_mib=peak / 1024,
                forward_peak_mib=(peak - (baseline or 0)) / 1024 if reset else None,
                peak_is_forward_only=reset, threads=torch.get_num_threads(), **info)


def _strip(argv: list[str], options: tuple[str, ...], flags: tuple[str, ...] = ()) -> list[str]:
    """argv without the given valued options (``--opt v`` or ``--opt=v``) and flags."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif a not in flags and not a.startswith(tuple(o + "=" for o in options)):
            out.append(a)
    return out


def _merge(runs: list[dict]) -> dict:
    """One configuration's processes: all times pooled; peak memory the largest seen."""
    times = [t for r in runs for t in r["times"]]
    forward = [r["forward_peak_mib"] for r in runs if r["forward_peak_mib"] is not None]
    merged = dict(runs[0], times=times, median_s=statistics.median(times), best_s=min(times),
                  peak_rss_mib=max(r["peak_rss_mib"] for r in runs),
                  forward_peak_mib=max(forward) if forward else None)
    return merged


def attention_gflop(args) -> float:
    """Band products + global rows/columns of one forward (multiply-add = 2 FLOPs)."""
    n, bsz, heads, d = args.seq_len, args.batch, 12, 64
    c = args.attention_window + 1
    band = 2 * 2 * bsz * n * heads * c * d  # qk and pv
    glob = 2 * 2 * 2 * bsz * n * heads * args.globals * d  # global columns and global rows
    return args.layers * (band + glob) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--attention-window", type=int, default=512, help="two-sided, as in transformers")
    parser.add_argument("--globals", type=int, default=1, help="global tokens at the start (0 = none)")
    parser.add_argument("--repeat", type=int, default=3, help="timed forwards per process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="processes per configuration, alternating between configurations")
    parser.add_argument("--warmup", type=int, default=1, help="full-length untimed forwards first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", action="store_true",
                        help="time training steps (train mode, forward + backward) instead of forwards")
    parser.add_argument("--attention-dropout", type=float, default=0.0,
                        help="attention_probs_dropout_prob (pretrained configs: 0.1); in training "
                             "with dropout > 0 our layer takes its unfused path")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--paired", action="store_true",
                        help="also time both attentions alternately in one process (robust to a "
                             "changing machine load) and report the median per-pair speed-up")
    parser.add_argument("--worker", choices=(*IMPLS, "paired"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.impl = args.worker
        print(json.dumps(paired_worker(args) if args.worker == "paired" else worker(args)))
        return

    forwarded = _strip(sys.argv[1:], ("--json", "--rounds"), ("--paired",))
    runs = {impl: [] for impl in args.impls}
    for _ in range(args.rounds):  # alternate, so a change in machine load hits both alike
        for impl in args.impls:
            cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--worker", impl]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{impl} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            runs[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {impl: _merge(r) for impl, r in runs.items()}
    paired = None
    if args.paired:
        cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--worker", "paired"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"paired run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        paired = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"LongformerModel base size: {args.layers} layers, N={args.seq_len}, batch {args.batch}, "
          f"attention_window {args.attention_window}, {args.globals} global token(s), "
          f"{'training step (forward + backward)' if args.train else 'forward only'}, "
          f"attention dropout {args.attention_dropout}, "
          f"{args.rounds} x {args.repeat} timed run(s)")
    print(f"attention band products: {attention_gflop(args):.1f} GFLOP per forward")
    print(f"{'attention':<16}{'median s':>10}{'best s':>10}{'peak RSS MiB':>14}{'forward MiB':>13}  notes")
    for impl, r in results.items():
        fwd = "n/a" if r["forward_peak_mib"] is None else f"{r['forward_peak_mib']:.0f}"
        note = f"backend={r['backend']}" if "backend" in r else ""
        print(f"{impl:<16}{r['median_s']:>10.2f}{r['best_s']:>10.2f}{r['peak_rss_mib']:>14.0f}{fwd:>13}  {note}")
    if len(results) == 2:
        hf, ours = results["transformers"], results["longformer_tvm"]
        print(f"speed-up (transformers / longformer_tvm, median): {hf['median_s'] / ours['median_s']:.2f}x")
        print(f"peak RSS ratio (longformer_tvm / transformers): {ours['peak_rss_mib'] / hf['peak_rss_mib']:.3f}")
    if paired is not None:
        t = {k: statistics.median(v) for k, v in paired["times"].items()}
        print(f"paired (alternating in one process): transformers {t['transformers']:.2f} s, "
              f"longformer_tvm {t['longformer_tvm']:.2f} s, median per-pair speed-up "
              f"{paired['median_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results, "paired": paired}, f, indent=2)


if __name__ == "__main__":
    main()
