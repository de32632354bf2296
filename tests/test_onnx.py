"""ONNX export: ``torch.onnx.export(..., dynamo=True)`` of the band products and of the layer gives
a standard ONNX graph that onnxruntime runs at sequence lengths other than the exported one.

Each model is exported once at N = 12 with N dynamic and run at N below the window, equal to it,
and not a multiple of it; results are held to float64 oracles (tolerance from what eager PyTorch
achieves in float32). The exporter's decomposition lives in ``longformer_tvm/_decompose.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch

import longformer_tvm as lt
from longformer_tvm._checks import normalize_band

from .oracle import dense_pv, dense_qk, dense_tpv

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) translates with it

EXPORT_N = 12
RUN_N = (1, 2, 5, 12, 13, 37)
B, H, D = 2, 2, 5

# (window, dilation, autoregressive)
PRODUCT_CASES = [
    (3, 1, False),
    (2, (1, 3), False),   # per-head dilation; w * d >= N at the short lengths
    (4, (2, 1), True),    # one-sided, per head
    (0, 1, False),        # C = 1
]


def _id(case) -> str:
    w, dil, ar = case
    return f"w{w}-d{dil}{'-ar' if ar else ''}".replace(" ", "")


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_close(got, want64: torch.Tensor, plain: torch.Tensor, what: str) -> None:
    """``got`` (numpy) may be off the float64 oracle by 8x eager float32's error (at least one
    float32 ulp of the largest entry); non-finite oracle entries must be reproduced exactly."""
    got, plain = torch.from_numpy(got).double(), plain.double()
    assert got.shape == want64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want64.shape)}"
    finite = torch.isfinite(want64)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite entries differ"
    assert torch.equal(got[~finite], want64[~finite]), f"{what}: non-finite values differ"
    if not finite.any():
        return
    scale = want64[finite].abs().max().item()
    base = max((plain[finite] - want64[finite]).abs().max().item(), torch.finfo(torch.float32).eps * scale)
    err = (got[finite] - want64[finite]).abs().max().item()
    assert err <= 8 * base, f"{what}: max error {err:.3e} > {8 * base:.3e}"


def _export(module: torch.nn.Module, inputs: tuple, names: list[str], dynamic_batch: bool = False):
    """Export with dim 1 (and dim 0 if asked) of every input dynamic; check that the graph is
    standard ONNX; return it with an onnxruntime session."""
    dims = {1: torch.export.Dim("n")}
    if dynamic_batch:
        dims[0] = torch.export.Dim("b")
    with torch.no_grad():
        program = torch.onnx.export(module.eval(), inputs, dynamo=True, input_names=names,
                                    dynamic_shapes=tuple(dims for _ in inputs), verbose=False)
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}, list(model.opset_import)
    assert not model.functions, [f.name for f in model.functions]
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return model, session


class Products(torch.nn.Module):
    def __init__(self, window, dilation, autoregressive):
        super().__init__()
        self.band = (window, dilation, autoregressive)

    def forward(self, q, k, p):
        s = lt.sliding_window_qk(q, k, *self.band, padding_value=float("-inf"))
        return s, lt.sliding_window_pv(p, k, *self.band), lt.sliding_window_pv_transposed(p, q, *self.band)


@functools.lru_cache(maxsize=None)
def _exported_products(case):
    c = normalize_band("test", *case, H).columns
    inputs = (_randn(B, EXPORT_N, H, D, seed=0), _randn(B, EXPORT_N, H, D, seed=1),
              _randn(B, EXPORT_N, H, c, seed=2))
    return _export(Products(*case), inputs, ["q", "k", "p"])


@pytest.mark.parametrize("case", PRODUCT_CASES, ids=_id)
def test_products_export_and_run_at_any_length(case):
    band = normalize_band("test", *case, H)
    c = band.columns
    _, session = _exported_products(case)
    for n in RUN_N:
        q, k, p = _randn(B, n, H, D, seed=n), _randn(B, n, H, D, seed=n + 1), _randn(B, n, H, c, seed=n + 2)
        s, o, t = session.run(None, {"q": q.numpy(), "k": k.numpy(), "p": p.numpy()})
        plain = Products(*case)(q, k, p)
        q64, k64, p64 = q.double(), k.double(), p.double()
        _assert_close(s, dense_qk(q64, k64, band, float("-inf")), plain[0], f"qk N={n}")
        _assert_close(o, dense_pv(p64, k64, band), plain[1], f"pv N={n}")
        _assert_close(t, dense_tpv(p64, q64, band), plain[2], f"tpv N={n}")


def test_graph_size_does_not_grow_with_the_window():
    """The products are block matmuls: the same operators for w = 3 and w = 40."""
    small, large = (sorted(node.op_type for node in _exported_products((w, 1, False))[0].graph.node)
                    for w in (3, 40))
    assert small == large
    assert "MatMul" in small and not any("band" in op.lower() for op in small)


# (window, dilation, autoregressive) of an E = 16, H = 2 layer
LAYER_CASES = [(3, [1, 2], False), (2, 1, True)]


@pytest.mark.parametrize("case", LAYER_CASES, ids=_id)
def test_layer_exports_and_runs_at_any_length(case):
    w, dil, ar = case
    torch.manual_seed(0)
    layer = lt.LongformerSelfAttention(16, H, w, dilation=dil, autoregressive=ar).eval()

    class Output(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x).output

    _, session = _export(Output(), (_randn(B, EXPORT_N, 16, seed=0),), ["x"], dynamic_batch=True)
    layer64 = lt.LongformerSelfAttention(16, H, w, dilation=dil, autoregressive=ar).double().eval()
    layer64.load_state_dict(layer.state_dict())
    for i, n in enumerate(RUN_N):
        x = _randn(1 + i % 3, n, 16, seed=n)  # the batch size varies too
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            _assert_close(got, layer64(x.double()).output, layer(x).output, f"layer B={x.shape[0]} N={n}")


def test_attention_op_with_a_key_mask_exports_and_runs_at_any_length():
    """sliding_window_attention (the fused op) exports as its band-product form."""
    from longformer_tvm._checks import normalize_band as nb

    from .oracle import dense_attention

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return lt.sliding_window_attention(q, k, v, 3, [1, 2], key_mask=mask != 0,
                                               return_lse=True)

    def inputs(n, seed):
        q, k, v = (_randn(B, n, H, D, seed=seed + i) for i in range(3))
        mask = (_randn(B, n, seed=seed + 3) > 0.8).to(torch.int64)
        return q, k, v, mask

    _, session = _export(Attention(), inputs(EXPORT_N, 0), ["q", "k", "v", "mask"])
    band = nb("test", 3, [1, 2], False, H)
    for n in RUN_N:
        q, k, v, mask = inputs(n, n)
        out, lse = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": mask.numpy()})
        want, want_lse = dense_attention(q, k, v, band, D ** -0.5, mask != 0)
        plain, plain_lse = Attention()(q, k, v, mask)
        _assert_close(out, want, plain, f"out N={n}")
        _assert_close(lse, want_lse, plain_lse, f"lse N={n}")
