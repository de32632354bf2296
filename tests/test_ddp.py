"""Distributed data parallel training through our attention: two gloo processes, two steps.

Each rank trains a transformers LongformerForSequenceClassification (attention swapped for ours) on
its own batch. Afterwards both ranks must hold identical parameters, and those must equal one
process doing the same two steps on the average of the two ranks' losses (what DDP computes).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

WORLD = 2
STEPS = 2
N = 160


def make_model():
    from transformers import LongformerConfig, LongformerForSequenceClassification

    from longformer_tvm.hf import use_tvm_attention

    torch.manual_seed(0)
    config = LongformerConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                              num_hidden_layers=2, attention_window=[16, 32], vocab_size=100,
                              max_position_embeddings=N + 8, num_labels=3, type_vocab_size=1,
                              attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    return use_tvm_attention(LongformerForSequenceClassification(config))


def rank_batch(rank: int, step: int):
    """Different data per rank and step: padding and a second global token at rank-specific places."""
    g = torch.Generator().manual_seed(100 * rank + step)
    ids = torch.randint(3, 100, (2, N), generator=g)
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, N - 17 * (rank + 1):] = 0
    glob = torch.zeros(2, N, dtype=torch.long)
    glob[:, 0] = 1
    glob[rank, 40 + 30 * rank] = 1
    labels = torch.randint(0, 3, (2,), generator=g)
    return dict(input_ids=ids, attention_mask=mask, global_attention_mask=glob, labels=labels)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = DDP(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(STEPS):
            opt.zero_grad()
            model(**rank_batch(rank, step)).loss.backward()
            opt.step()
        torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_end_with_identical_parameters(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert list(states[0]) == list(states[1])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"{key} differs between ranks"

    # The same two steps in one process, on the mean of the ranks' losses.
    model = make_model()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        opt.zero_grad()
        loss = sum(model(**rank_batch(r, step)).loss for r in range(WORLD)) / WORLD
        loss.backward()
        opt.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # Training reached our attention's projections. (The classifier reads token 0, which is global,
    # so the last layer's local projections get no gradient -- in transformers' model as well.)
    trained = [f"longformer.encoder.layer.0.attention.self.{p}.weight" for p in
               ("query", "key", "value", "query_global", "key_global", "value_global")]
    trained += [f"longformer.encoder.layer.1.attention.self.{p}.weight" for p in
                ("query_global", "key_global", "value_global")]
    for key in trained:
        assert not torch.equal(states[0][key], initial[key]), f"{key} did not train"
