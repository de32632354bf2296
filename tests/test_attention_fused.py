"""The layer's fused path (``attend_fused``): one attention op for the band, global columns merged
by log-sum-exp, against the dense float64 reference of tests/test_attention.py.

``forced`` runs the fused path whatever the library holds (the op then computes through the band
products, as on CUDA); ``served`` is the path the layer takes here on its own, which is the fused
kernel where the CPU library has it.
"""

from __future__ import annotations

import pytest
import torch

from longformer_tvm import _attend, _fused

from .test_attention import CASES, Case, check_backward, check_close, dense_reference, make_inputs, make_layer


@pytest.fixture(params=["forced", "served"])
def fused_path(request, monkeypatch):
    calls = []
    real = _fused.attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(_fused, "attention", spy)
    if request.param == "forced":
        monkeypatch.setattr(_fused, "served", lambda device_type, dtype: True)
    elif not _fused.served("cpu", torch.float32):
        pytest.skip("this library has no fused kernel: the layer takes the unfused paths")
    return calls


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_matches_dense_reference(case, fused_path):
    x, mask, glob = make_inputs(case)
    layer = make_layer(case).eval()
    with torch.no_grad():
        out = layer(x, attention_mask=mask, global_attention_mask=glob)
        ref64, _ = dense_reference(layer, x, mask, glob)
        ref32, _ = dense_reference(layer, x, mask, glob, torch.float32)
    assert fused_path, "the fused path was not taken"
    assert out.attn_probs is None and out.global_attn_probs is None
    check_close(out.output, ref64, ref32, what="output")


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("pad-global", "dil-per-head", "ar-dil-per-head-global",
                                                                "sparse-globals")], ids=lambda c: c.id)
def test_backward_matches_dense_reference(case, fused_path):
    def taken():
        assert fused_path, "the fused path was not taken"

    check_backward(case, before_references=taken)


def test_probabilities_and_training_dropout_keep_the_unfused_path(fused_path):
    case = Case("keep", 40, 2, 4, 3, padding=True, globals_=((1,), ()))
    x, mask, glob = make_inputs(case)
    layer = make_layer(case, dropout=0.1).eval()
    with torch.no_grad():
        assert layer(x, mask, glob, output_attentions=True).attn_probs is not None
    layer.train()
    layer(x, mask, glob)
    assert not fused_path
    layer.eval()
    layer(x, mask, glob)
    assert len(fused_path) == 1


def test_extreme_logits_merge_without_overflow(fused_path):
    """A global column far above the band (or below) must not overflow the LSE merge."""
    case = Case("extreme", 90, 3, 8, 6, dilation=(1, 2, 1), padding=True, globals_=((0, 45), (7,)))
    x, mask, glob = make_inputs(case)
    layer = make_layer(case).eval()
    with torch.no_grad():
        layer.query.weight.mul_(300.0)
        out = layer(x, mask, glob).output
        ref64, _ = dense_reference(layer, x, mask, glob)
        ref32, _ = dense_reference(layer, x, mask, glob, torch.float32)
    assert torch.isfinite(out).all()
    check_close(out, ref64, ref32, what="output")
