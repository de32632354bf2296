"""The transformers integration: exact parity with transformers' own Longformer attention, and the swap.

transformers' eager LongformerSelfAttention is the reference: the same model (random init, no
download) runs with its own attention and with ours, on the same inputs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    LongformerConfig,
    LongformerForMaskedLM,
    LongformerForMultipleChoice,
    LongformerForQuestionAnswering,
    LongformerForSequenceClassification,
    LongformerForTokenClassification,
    LongformerModel,
)
from transformers.models.longformer import modeling_longformer  # noqa: E402

from longformer_tvm.hf import (  # noqa: E402
    HFLongformerSelfAttention,
    is_tvm_attention,
    restore_hf_attention,
    tvm_attention,
    use_tvm_attention,
)

LENGTHS = [1, 100, 511, 1000, 4096]


def small_config(**overrides) -> LongformerConfig:
    kw = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
              attention_window=[64, 128], vocab_size=120, max_position_embeddings=4200,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=1)
    kw.update(overrides)
    return LongformerConfig(**kw)


def batch(n: int, seed: int = 0, vocab: int = 120):
    """Two samples: global tokens at different positions (and counts), padding in different places.

    Sample 0: globals at 0 and near the end, a padded hole. Sample 1: globals at n//3 and n//2, a
    padded tail, and a global flag on a padded token (padding wins).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    glob = torch.zeros(2, n, dtype=torch.long)
    glob[0, 0] = 1
    if n > 1:
        glob[0, n - 2] = 1
        mask[0, n // 4: n // 4 + max(1, n // 50)] = 0
        tail = n * 2 // 3 + 1
        mask[1, tail:] = 0
        glob[1, [n // 3, n // 2, n - 1]] = 1
    return ids, mask, glob


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LongformerModel(small_config())


def run(model, ids, mask, glob, weights, grads=True):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, global_attention_mask=glob, output_attentions=True)
    if grads:
        loss = (out.last_hidden_state * weights).sum() + out.pooler_output.sum()
        loss.backward()
    g = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return out, g


def assert_grads_close(ours: dict, theirs: dict, rtol: float = 1e-4):
    """Per parameter: max |difference| <= rtol * max |transformers' gradient|.

    The key projections' biases get a zero gradient in exact arithmetic (adding q.b to every score
    of a row does not change its softmax), so both sides hold rounding noise there: they are held
    to the scale of the matching weight's gradient instead.
    """
    assert set(ours) == set(theirs)
    # a gradient that is exactly 0 on one side (q at N=1: one key, softmax 1) is rounding noise
    # on the other: held to float32's epsilon times the largest gradient
    floor = 1e-7 * max(g.abs().max().item() for g in theirs.values())
    for name, ref in theirs.items():
        scale_name = name
        if name.endswith((".key.bias", ".key_global.bias", ".k_proj.bias")):  # (LED's too)
            scale_name = name[: -len("bias")] + "weight"
        scale = theirs[scale_name].abs().max().item()
        err = (ours[name] - ref).abs().max().item()
        assert err <= max(rtol * scale, floor), f"{name}: {err:.3g} > {rtol} * {scale:.3g}"


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"n{n}")
def test_model_parity_with_transformers(model, n):
    ids, mask, glob = batch(n)
    weights = torch.randn(2, n, model.config.hidden_size, generator=torch.Generator().manual_seed(n))
    ref, ref_grads = run(model, ids, mask, glob, weights)
    with tvm_attention(model):
        assert is_tvm_attention(model)
        out, grads = run(model, ids, mask, glob, weights)
    assert not is_tvm_attention(model)

    err = (out.last_hidden_state - ref.last_hidden_state).abs().max().item()
    assert err <= 1e-5, f"last_hidden_state differs by {err:.3g}"
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=1e-5)
    for ours, theirs in zip(out.attentions, ref.attentions, strict=True):  # (B, H, N, G + 2w + 1)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    for ours, theirs in zip(out.global_attentions, ref.global_attentions, strict=True):  # (B, H, N, G)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert_grads_close(grads, ref_grads)


def test_dropout_in_training_matches_transformers_under_the_same_seed():
    """Same RNG draws in the same order: local probabilities first, then the global ones."""
    torch.manual_seed(3)
    m = LongformerModel(small_config(attention_probs_dropout_prob=0.25)).train()
    n = 300
    ids, mask, glob = batch(n, seed=1)

    def forward():
        torch.manual_seed(11)
        return m(ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state

    ref = forward()
    with tvm_attention(m):
        out = forward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    m.eval()
    assert (m(ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state - ref).abs().max() > 1e-3


def test_swap_shares_parameters_and_keeps_state_dict_and_order(model):
    before_params = list(model.named_parameters())
    before_state = model.state_dict()
    originals = [layer.attention.self for layer in model.encoder.layer]
    use_tvm_attention(model)
    try:
        swapped = [layer.attention.self for layer in model.encoder.layer]
        assert all(isinstance(s, HFLongformerSelfAttention) for s in swapped)
        assert [s.one_sided_attn_window_size for s in swapped] == [32, 64]
        after_params = list(model.named_parameters())
        assert [n for n, _ in after_params] == [n for n, _ in before_params]
        assert all(a is b for (_, a), (_, b) in zip(after_params, before_params))
        after_state = model.state_dict()
        assert list(after_state) == list(before_state)
        assert all(after_state[k].data_ptr() == before_state[k].data_ptr() for k in before_state)
        use_tvm_attention(model)  # idempotent
        assert [layer.attention.self for layer in model.encoder.layer] == swapped
    finally:
        restore_hf_attention(model)
    restored = [layer.attention.self for layer in model.encoder.layer]
    assert all(a is b for a, b in zip(restored, originals))
    assert all(type(s) is modeling_longformer.LongformerSelfAttention for s in restored)
    assert all(a is b for (_, a), (_, b) in zip(model.named_parameters(), before_params))


def test_optimizer_built_before_the_swap_trains_the_shared_weights():
    torch.manual_seed(0)
    m = LongformerModel(small_config())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    q = m.encoder.layer[0].attention.self.query.weight
    start = q.detach().clone()
    ids, mask, glob = batch(70)
    weights = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(0))
    with tvm_attention(m):
        (m(ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state * weights).sum().backward()
        opt.step()
    assert not torch.equal(q.detach(), start)
    assert m.encoder.layer[0].attention.self.query.weight is q


def test_context_manager_restores_only_what_it_swapped_and_carries_mode():
    torch.manual_seed(0)
    m = LongformerModel(small_config())
    use_tvm_attention(m)
    with tvm_attention(m):
        pass
    assert is_tvm_attention(m)
    m.eval()
    restore_hf_attention(m)
    assert all(not layer.attention.self.training for layer in m.encoder.layer)
    m.train()
    use_tvm_attention(m)  # the swap takes the current mode
    assert all(layer.attention.self.training for layer in m.encoder.layer)
    restore_hf_attention(m)


@pytest.mark.parametrize("cls", [LongformerForMaskedLM, LongformerForSequenceClassification,
                                 LongformerForQuestionAnswering, LongformerForTokenClassification,
                                 LongformerForMultipleChoice], ids=lambda c: c.__name__)
def test_task_models_match_transformers(cls):
    torch.manual_seed(0)
    m = cls(small_config(sep_token_id=2)).eval()
    ids, mask, glob = batch(150, seed=4)
    ids[:, [20, 21, 60]] = 2  # separators, for the models that place global attention themselves
    kwargs = dict(attention_mask=mask)
    if cls is LongformerForMultipleChoice:
        ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
        kwargs = dict(attention_mask=mask)
    elif cls is not LongformerForQuestionAnswering:
        kwargs["global_attention_mask"] = glob
    with torch.no_grad():
        ref = m(ids, **kwargs)
        with tvm_attention(m):
            out = m(ids, **kwargs)
    for key in ref.keys():
        if isinstance(ref[key], torch.Tensor):
            torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-5)


def test_layer_called_with_only_the_extended_mask(model):
    """transformers' mask values alone (no is_index_* arguments) are understood."""
    hf_layer = model.encoder.layer[0].attention.self
    ours = HFLongformerSelfAttention.from_hf(hf_layer)
    n = 128
    x = torch.randn(2, n, 32)
    mask = torch.zeros(2, n)
    mask[1, 90:] = torch.finfo(torch.float32).min
    mask[0, [0, 77]] = torch.finfo(torch.float32).max
    with torch.no_grad():
        ref = hf_layer(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                       is_global_attn=True, output_attentions=True)
        out = ours(x, attention_mask=mask, output_attentions=True)
    assert len(out) == len(ref) == 3
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert ours.query is hf_layer.query and ours.to_hf() is hf_layer


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        use_tvm_attention("not a model")
    with pytest.raises(ValueError, match="no transformers LongformerSelfAttention"):
        use_tvm_attention(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="LongformerSelfAttention"):
        HFLongformerSelfAttention.from_hf(torch.nn.Linear(3, 3))


def test_importing_the_package_does_not_import_transformers():
    code = ("import sys, longformer_tvm, longformer_tvm.hf; "
            "sys.exit(1 if 'transformers' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr or "transformers was imported"
