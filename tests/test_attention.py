"""LongformerSelfAttention against a dense float64 reference built from the band mask.

The reference materialises the (N, N) mask with ``reference.band_mask`` and does plain softmax
attention in float64; our layer runs in float32 on whatever backend is active. Tolerances follow
the house rule: our float32 error against float64 may be at most a small multiple of the same
dense computation's float32 error (plus a tiny floor for exact zeros).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from longformer_tvm import AttentionOutput, LongformerSelfAttention, reference
from longformer_tvm._checks import normalize_band


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    n: int
    heads: int
    head_dim: int
    window: int
    dilation: object = 1
    autoregressive: bool = False
    padding: bool = False
    globals_: tuple = ()  # per sample: tuple of global positions (may include a padded one)


CASES = [
    Case("n1", 1, 2, 4, 3),
    Case("n1-global", 1, 2, 4, 3, globals_=((0,), ())),
    Case("w0", 9, 2, 4, 0, padding=True, globals_=((2,), ())),
    Case("basic-odd-n", 37, 2, 5, 4),
    Case("window-ge-n", 11, 3, 4, 16, padding=True),
    Case("pad-global", 50, 2, 8, 6, padding=True, globals_=((0, 7, 49), (3,))),
    Case("dil2", 45, 2, 4, 3, dilation=2, padding=True, globals_=((5,), (0, 30))),
    Case("dil-per-head", 61, 4, 6, 4, dilation=(1, 2, 3, 1), padding=True, globals_=((1, 40), ())),
    Case("dil-per-head-tensor", 29, 3, 4, 3, dilation=torch.tensor([3, 1, 2])),
    Case("ar", 40, 2, 4, 5, autoregressive=True),
    Case("ar-pad", 33, 2, 7, 3, autoregressive=True, padding=True),
    Case("ar-dil-per-head-global", 57, 4, 4, 4, dilation=(1, 3, 2, 4), autoregressive=True,
         padding=True, globals_=((0, 20), (10, 11, 12))),
    # few global tokens, no padding: the removed keys are written by index, not by a masked pass
    Case("sparse-globals", 200, 2, 4, 7, dilation=(1, 3), globals_=((0, 100, 199), (50,))),
    Case("sparse-globals-ar", 160, 2, 4, 9, dilation=(2, 1), autoregressive=True, globals_=((3,), (80, 159))),
]


def make_inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bsz = 2
    x = torch.randn(bsz, case.n, case.heads * case.head_dim, generator=g)
    mask = torch.ones(bsz, case.n, dtype=torch.bool)
    if case.padding:  # sample 1: a padded tail; sample 0: a padded hole in the middle
        mask[1, case.n * 2 // 3 + 1:] = False
        mask[0, case.n // 3: case.n // 3 + 2] = False
    glob = torch.zeros(bsz, case.n, dtype=torch.bool)
    for b, positions in enumerate(case.globals_):
        glob[b, list(positions)] = True
    return x, mask, glob


def make_layer(case: Case, dropout: float = 0.0, seed: int = 1) -> LongformerSelfAttention:
    torch.manual_seed(seed)
    return LongformerSelfAttention(case.heads * case.head_dim, case.heads, case.window, case.dilation,
                                   case.autoregressive, dropout=dropout)


def dense_reference(layer: LongformerSelfAttention, x, mask, glob, dtype=torch.float64):
    """Output (B, N, E) and dense probabilities (B, H, N, N) of the layer's semantics, O(N^2).

    Local row i: band keys that are real and not global, plus global keys (<= i if autoregressive),
    local projections. Global row p: all real keys (<= p if autoregressive), global projections.
    Padding rows: zero output and zero probabilities.
    """
    bsz, n, e = x.shape
    h, d = layer.num_heads, layer.head_dim
    x = x.to(dtype)
    glob = glob & mask

    def proj(name):
        lin = getattr(layer, name)
        bias = None if lin.bias is None else lin.bias.to(dtype)
        return torch.nn.functional.linear(x, lin.weight.to(dtype), bias).view(bsz, n, h, d).transpose(1, 2)

    causal = torch.ones(n, n, dtype=torch.bool)
    if layer.autoregressive:
        causal = torch.ones(n, n, dtype=torch.bool).tril()
    band = reference.band_mask(n, layer.band)  # (H, N, N)
    real_key = mask[:, None, None, :]
    local_allowed = (band[None] & real_key & ~glob[:, None, None, :]) | (glob[:, None, None, :] & causal)
    global_allowed = (real_key & causal).expand(bsz, h, n, n)

    def attend(q, k, v, allowed):
        s = (q @ k.transpose(-1, -2)) / d ** 0.5
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        p = torch.nan_to_num(p, nan=0.0)
        return p @ v, p

    out_l, p_l = attend(proj("query"), proj("key"), proj("value"), local_allowed)
    out_g, p_g = attend(proj("query_global"), proj("key_global"), proj("value_global"), global_allowed)
    row_global = glob[:, None, :, None]
    out = torch.where(row_global, out_g, out_l)
    probs = torch.where(row_global, p_g, p_l)
    real_row = mask[:, None, :, None]
    out = torch.where(real_row, out, torch.zeros((), dtype=dtype))
    probs = torch.where(real_row, probs, torch.zeros((), dtype=dtype))
    return out.transpose(1, 2).reshape(bsz, n, e), probs


def to_dense_probs(layer, out: AttentionOutput, glob, n):
    """Our (banded + global-column, global-row) probabilities scattered into (B, H, N, N)."""
    attn, gprobs = out.attn_probs, out.global_attn_probs
    g = 0 if gprobs is None else gprobs.shape[2]
    dense = reference.to_dense(attn[..., g:].double(), layer.band)
    bsz = attn.shape[0]
    for b in range(bsz):
        positions = glob[b].nonzero().flatten().tolist()
        for slot, p in enumerate(positions):
            dense[b, :, :, p] += attn[b, :, :, slot].double().transpose(0, 1)
            dense[b, :, p, :] = gprobs[b, :, slot].double()
    return dense


def check_close(ours, ref64, ref32, factor=4.0, floor=1e-6, what=""):
    ours, ref32 = ours.double(), ref32.double()
    err = (ours - ref64).abs().max().item()
    base = (ref32 - ref64).abs().max().item()
    assert err <= factor * base + floor, f"{what}: error {err:.3g} vs float32 reference error {base:.3g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_matches_dense_reference(case):
    x, mask, glob = make_inputs(case)
    layer = make_layer(case).eval()
    with torch.no_grad():
        out = layer(x, attention_mask=mask, global_attention_mask=glob, output_attentions=True)
        ref64, p64 = dense_reference(layer, x, mask, glob)
        ref32, p32 = dense_reference(layer, x, mask, glob, torch.float32)
    assert out.output.shape == x.shape and out.output.dtype == x.dtype
    check_close(out.output, ref64, ref32, what="output")
    has_global = bool((glob & mask).any())
    assert (out.global_attn_probs is not None) == has_global
    c = layer.band.columns
    assert out.attn_probs.shape == (2, case.n, case.heads, c + (out.global_attn_probs.shape[2] if has_global else 0))
    dense = to_dense_probs(layer, out, glob & mask, case.n)
    check_close(dense, p64, p32, what="probabilities")
    # global rows' and padding rows' banded probabilities are zero (their values live elsewhere)
    zero_rows = (glob & mask) | ~mask
    assert torch.count_nonzero(out.attn_probs[zero_rows]).item() == 0


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("pad-global", "dil-per-head", "ar-dil-per-head-global")],
                         ids=lambda c: c.id)
def test_backward_matches_dense_reference(case):
    check_backward(case)


def check_backward(case: Case, before_references=None) -> None:
    """The layer's gradients (input and every parameter) against the dense reference's;
    ``before_references()`` runs right after ours (e.g. to assert which path ran)."""
    x, mask, glob = make_inputs(case)
    layer = make_layer(case)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))

    def grads(fn, dtype):
        params = list(layer.parameters())
        xx = x.to(dtype).requires_grad_(True)
        loss = (fn(xx) * w.to(dtype)).sum()
        return torch.autograd.grad(loss, [xx, *params])

    ours = grads(lambda xx: layer(xx, mask, glob).output, torch.float32)
    if before_references is not None:
        before_references()
    ref64 = grads(lambda xx: dense_reference(layer, xx, mask, glob)[0], torch.float64)
    ref32 = grads(lambda xx: dense_reference(layer, xx, mask, glob, torch.float32)[0], torch.float32)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, r64, r32 in zip(names, ours, ref64, ref32):
        scale = max(r64.abs().max().item(), 1e-3)
        check_close(a, r64, r32, factor=8.0, floor=1e-6 * scale, what=f"grad {name}")


def test_dropout_is_applied_to_the_returned_probabilities():
    case = Case("drop", 64, 2, 8, 5, dilation=(1, 2), padding=True, globals_=((3,), (0, 50)))
    x, mask, glob = make_inputs(case)
    p = 0.3
    layer = make_layer(case, dropout=p)
    with torch.no_grad():
        clean = layer.eval()(x, mask, glob, output_attentions=True)
        torch.manual_seed(123)
        noisy = layer.train()(x, mask, glob, output_attentions=True)
    kept = noisy.attn_probs != 0
    live = clean.attn_probs != 0
    # every kept entry is the clean one scaled by 1/(1-p); about p of the live entries are dropped
    torch.testing.assert_close(noisy.attn_probs[kept], clean.attn_probs[kept] / (1 - p))
    dropped = (live & ~kept).sum().item() / live.sum().item()
    assert abs(dropped - p) < 0.03, dropped
    # the output of local rows is exactly the dropped-out probabilities times the values
    dense = to_dense_probs(layer, noisy, glob & mask, case.n)
    v = layer.value(x).double().view(2, case.n, 2, 8).transpose(1, 2)
    expect = (dense @ v).transpose(1, 2).reshape(2, case.n, 16)
    local = mask & ~glob
    torch.testing.assert_close(noisy.output[local].double(), expect[local], atol=1e-5, rtol=1e-5)
    # and the global rows use the dropped-out global probabilities with the global values
    vg = layer.value_global(x).double().view(2, case.n, 2, 8).transpose(1, 2)
    expect_g = (dense @ vg).transpose(1, 2).reshape(2, case.n, 16)
    torch.testing.assert_close(noisy.output[glob].double(), expect_g[glob], atol=1e-5, rtol=1e-5)
    assert not torch.equal(noisy.output, clean.output)


def test_train_mode_without_dropout_equals_eval():
    case = CASES[5]
    x, mask, glob = make_inputs(case)
    layer = make_layer(case)
    torch.testing.assert_close(layer.train()(x, mask, glob).output, layer.eval()(x, mask, glob).output,
                               rtol=0, atol=0)


def test_masks_accept_int_float_and_bool_and_padding_beats_global():
    case = Case("masks", 20, 2, 4, 3, padding=True, globals_=((2,), (19,)))  # 19 is padding in sample 1
    x, mask, glob = make_inputs(case)
    layer = make_layer(case).eval()
    with torch.no_grad():
        a = layer(x, mask, glob).output
        b = layer(x, mask.long(), glob.float()).output
        c = layer(x, mask, glob & mask).output
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert a[1, 19].abs().max().item() == 0.0  # a padding row outputs zeros


def test_no_masks_equals_all_real_masks():
    case = CASES[3]
    x, _, _ = make_inputs(case)
    layer = make_layer(case).eval()
    ones = torch.ones(x.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).output, layer(x, ones, ~ones).output, rtol=0, atol=0)


def test_results_do_not_depend_on_right_padding():
    """Padding is handled inside: extra padded tokens at the end change nothing for real tokens."""
    case = Case("pad-invariance", 70, 2, 4, 8, dilation=(1, 3), globals_=((4,), (0, 69)))
    x, mask, glob = make_inputs(case)
    layer = make_layer(case).eval()
    extra = 25
    xp = torch.cat([x, torch.randn(2, extra, x.shape[2])], dim=1)
    mp = torch.cat([mask, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
    gp = torch.cat([glob, torch.ones(2, extra, dtype=torch.bool)], dim=1)  # marked global, yet padding
    with torch.no_grad():
        a = layer(x, mask, glob).output
        b = layer(xp, mp, gp).output
    torch.testing.assert_close(b[:, :70], a, atol=2e-6, rtol=1e-5)
    assert b[:, 70:].abs().max().item() == 0.0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(embed_dim=10, num_heads=3, window=2), ValueError, "multiple of num_heads"),
    (dict(embed_dim=8, num_heads=0, window=2), ValueError, "num_heads"),
    (dict(embed_dim=8, num_heads=2, window=-1), ValueError, "window"),
    (dict(embed_dim=8, num_heads=2, window=2, dilation=(1, 2, 3)), ValueError, "one entry per head"),
    (dict(embed_dim=8, num_heads=2, window=2, dilation=0), ValueError, "dilation"),
    (dict(embed_dim=8, num_heads=2, window=2, dropout=1.5), ValueError, "dropout"),
    (dict(embed_dim=8, num_heads=2, window=2, autoregressive=1), TypeError, "autoregressive"),
])
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LongformerSelfAttention(**kwargs)


def test_forward_rejects_bad_inputs():
    layer = LongformerSelfAttention(8, 2, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(5, 8))
    with pytest.raises(TypeError, match="hidden_states"):
        layer(x.long())
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="global_attention_mask"):
        layer(x, None, torch.ones(5, 2))
    with pytest.raises(TypeError, match="attention_mask"):
        layer(x, [[1] * 5] * 2)


def test_from_projections_shares_parameters_and_state_dict_keys():
    layer = LongformerSelfAttention(12, 3, 2, dilation=(1, 2, 1))
    twin = LongformerSelfAttention.from_projections(
        layer.query, layer.key, layer.value, layer.query_global, layer.key_global, layer.value_global,
        num_heads=3, window=2, dilation=(1, 2, 1))
    assert all(a is b for a, b in zip(layer.parameters(), twin.parameters()))
    assert list(layer.state_dict()) == list(twin.state_dict())
    x = torch.randn(1, 9, 12)
    torch.testing.assert_close(layer(x).output, twin(x).output, rtol=0, atol=0)
    with pytest.raises(ValueError, match="E -> E"):
        LongformerSelfAttention.from_projections(
            layer.query, layer.key, torch.nn.Linear(12, 6), layer.query_global, layer.key_global,
            layer.value_global, num_heads=3, window=2)


def test_band_geometry_is_normalised_once():
    layer = LongformerSelfAttention(8, 2, 3, dilation=torch.tensor([2, 1]), autoregressive=True)
    assert layer.band == normalize_band("x", 3, (2, 1), True, 2)
    assert (layer.window, layer.dilation, layer.autoregressive) == (3, (2, 1), True)
    assert "dilation=[2, 1]" in repr(layer)


@pytest.mark.parametrize("boost", [1.0, 300.0], ids=["ordinary-logits", "extreme-logits"])
def test_inference_path_equals_autograd_path(boost):
    """Without autograd the scores are normalised in place (global columns as a per-row scale);
    with it, transformers' concatenate-then-softmax. Both must give the same numbers, also when
    a query's own score is far below its row's maximum (the in-place path's fallback)."""
    case = Case("paths", 90, 3, 8, 6, dilation=(1, 2, 1), padding=True, globals_=((0, 45), (7,)))
    x, mask, glob = make_inputs(case)
    layer = make_layer(case).eval()
    with torch.no_grad():
        layer.query.weight.mul_(boost)
        fast = layer(x, mask, glob, output_attentions=True)
    slow = layer(x, mask, glob, output_attentions=True)
    assert slow.output.requires_grad
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ref64, _ = dense_reference(layer, x, mask, glob)
        ref32, _ = dense_reference(layer, x, mask, glob, torch.float32)
    check_close(fast.output, ref64, ref32, what="output")
