"""A 4096-token document through a Longformer, with transformers' attention and with ours.

Builds a LongformerModel from a config (random weights, nothing downloaded), runs one forward pass
on CPU with transformers' own self-attention and one with longformer_tvm's (the same weights,
swapped in place), and prints the largest difference of the outputs and both times.

    python examples/long_document.py                 # base width, 2 layers
    python examples/long_document.py --layers 12     # the whole base-size model

Set LONGFORMER_TVM_BACKEND=reference to run on the plain-PyTorch band products (slow, exact) when
the compiled kernels are not built.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LongformerConfig, LongformerModel

import longformer_tvm
from longformer_tvm.hf import tvm_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--attention-window", type=int, default=512, help="two-sided, as in transformers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = LongformerConfig(num_hidden_layers=args.layers, attention_window=args.attention_window,
                              max_position_embeddings=args.seq_len + 2)  # base size otherwise
    model = LongformerModel(config, add_pooling_layer=False).eval()

    # A document of random tokens: global attention on <s> and a "question" span; the last 100
    # positions are padding.
    n = args.seq_len
    input_ids = torch.randint(5, config.vocab_size, (1, n))
    input_ids[0, 0] = config.bos_token_id
    attention_mask = torch.ones(1, n, dtype=torch.long)
    attention_mask[0, n - min(100, n - 1):] = 0
    global_attention_mask = torch.zeros(1, n, dtype=torch.long)
    global_attention_mask[0, : min(16, n)] = 1
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  global_attention_mask=global_attention_mask)

    def timed(inputs):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model(**inputs).last_hidden_state
        return out, time.perf_counter() - start

    short = {k: v[:, : 2 * args.attention_window] for k, v in inputs.items()}

    print(f"LongformerModel: {args.layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads, attention_window {args.attention_window}, {n} tokens")
    print(f"longformer_tvm backend: {longformer_tvm.backend_info()['mode']}")
    timed(short)  # warm-up on a short input
    theirs, t_theirs = timed(inputs)
    with tvm_attention(model):
        timed(short)  # the first call loads the kernels
        ours, t_ours = timed(inputs)
    diff = (ours - theirs).abs().max().item()
    print(f"largest |difference| of last_hidden_state: {diff:.3g}")
    print(f"transformers attention: {t_theirs:.2f} s")
    print(f"longformer_tvm attention: {t_ours:.2f} s  ({t_theirs / t_ours:.2f}x)")


if __name__ == "__main__":
    main()
