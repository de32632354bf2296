"""The ONNX decompositions (longformer_tvm/_decompose.py) sit in torch's decomposition table, so
with symbolic sizes torch.compile's fake tensors take them over the ops' register_fake: their
strides must be the kernels' (contiguous), or Inductor's stride check fails when a compiled
layer is called at a second sequence length."""

from __future__ import annotations

import torch

import longformer_tvm as lt


def test_a_compiled_layer_runs_at_a_second_length_with_the_decompositions_registered():
    torch.manual_seed(0)
    layer = lt.LongformerSelfAttention(64, 4, 8)
    compiled = torch.compile(layer, backend="inductor")
    for n in (40, 57):  # the second length recompiles with a symbolic N
        x = torch.randn(2, n, 64, requires_grad=True)
        got, want = compiled(x), layer(x)
        got, want = (o[0] if isinstance(o, tuple) else o for o in (got, want))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
