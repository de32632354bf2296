"""Parity with transformers where no probabilities are returned (the layer's fused path where a
fused kernel serves, else its unfused paths), for Longformer and for LED's encoder.

Same model (random init, no download) with transformers' attention and with ours, same inputs,
forward and gradients, in eval and train mode (dropout 0). ``forced`` makes the layer take the
fused path whatever the library holds.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LEDConfig, LEDForConditionalGeneration, LEDModel, LongformerModel  # noqa: E402

from longformer_tvm import _fused  # noqa: E402
from longformer_tvm.hf import is_tvm_attention, tvm_attention, use_tvm_attention  # noqa: E402

from .test_hf import assert_grads_close, batch, small_config  # noqa: E402


def led_config(**overrides) -> LEDConfig:
    kw = dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
              attention_window=[16, 32], vocab_size=120, max_encoder_position_embeddings=1100,
              max_decoder_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
              activation_dropout=0.0)
    kw.update(overrides)
    return LEDConfig(**kw)


@pytest.fixture(params=["served", "forced"])
def path(request, monkeypatch):
    if request.param == "forced":
        monkeypatch.setattr(_fused, "served", lambda device_type, dtype: True)
    return request.param


def _run(model, kind, n, train):
    ids, mask, glob = batch(n)
    model.train(train)
    model.zero_grad(set_to_none=True)
    if kind == "led":
        dec = ids[:, :5]
        out = model(ids, attention_mask=mask, global_attention_mask=glob, decoder_input_ids=dec)
        hidden = out.encoder_last_hidden_state if hasattr(out, "encoder_last_hidden_state") else out[0]
        head = out.logits if hasattr(out, "logits") else out.last_hidden_state
    else:
        out = model(ids, attention_mask=mask, global_attention_mask=glob)
        hidden, head = out.last_hidden_state, out.pooler_output
    w = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(n))
    ((hidden * w).sum() + head.sum()).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), head.detach(), grads


MODELS = {
    "longformer": lambda: LongformerModel(small_config()),
    "led": lambda: LEDModel(led_config()),
    "led-generation": lambda: LEDForConditionalGeneration(led_config()),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("n", [1, 77, 600], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("kind", list(MODELS))
def test_parity_with_transformers_without_probabilities(kind, n, train, path):
    torch.manual_seed(0)
    model = MODELS[kind]()
    ref = _run(model, "led" if kind.startswith("led") else kind, n, train)
    with tvm_attention(model):
        assert is_tvm_attention(model)
        got = _run(model, "led" if kind.startswith("led") else kind, n, train)
    for name, a, b in (("encoder hidden", got[0], ref[0]), ("head", got[1], ref[1])):
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * max(1.0, b.abs().max().item()), f"{name} differs by {err:.3g}"
    assert_grads_close(got[2], ref[2])


def test_led_swaps_only_the_encoder_self_attention():
    from transformers.models.led import modeling_led
    model = LEDForConditionalGeneration(led_config())
    use_tvm_attention(model)
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("HFLongformerSelfAttention") == 2  # two encoder layers
    assert not any(isinstance(m, modeling_led.LEDEncoderSelfAttention) for m in model.modules())
    assert any(isinstance(m, modeling_led.LEDDecoderAttention) for m in model.modules())
