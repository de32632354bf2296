"""Autograd, torch.library plumbing, torch.compile, argument errors and the loader's promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import longformer_tvm as lt
from longformer_tvm import ops

from .registry import private_registry


def _t(*shape, dtype=torch.float64, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


GRAD_CASES = [  # (N, H, D, w, dilation, autoregressive)
    (9, 2, 3, 2, 1, False),
    (11, 3, 4, 3, [1, 2, 3], False),
    (10, 2, 3, 4, 2, True),
    (5, 1, 2, 7, 1, False),  # w >= N
]


@pytest.mark.parametrize("n,h,d,w,dil,ar", GRAD_CASES)
def test_gradcheck_all_products(n, h, d, w, dil, ar):
    c = w + 1 if ar else 2 * w + 1
    q, k, p = _t(2, n, h, d), _t(2, n, h, d, seed=1), _t(2, n, h, c, seed=2)
    assert torch.autograd.gradcheck(lambda a, b: lt.sliding_window_qk(a, b, w, dil, ar), (q, k))
    assert torch.autograd.gradcheck(lambda a, b: lt.sliding_window_pv(a, b, w, dil, ar), (p, k))
    assert torch.autograd.gradcheck(
        lambda a, b: lt.sliding_window_pv_transposed(a, b, w, dil, ar), (p, q))


def test_gradients_ignore_padding_positions():
    q, k = _t(1, 6, 1, 4), _t(1, 6, 1, 4, seed=1)
    s = lt.sliding_window_qk(q, k, 3, padding_value=float("-inf"))
    probs = torch.softmax(s, dim=-1)
    out = lt.sliding_window_pv(probs, k, 3)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(dtype):
    q, k = _t(2, 13, 3, 4, dtype=dtype), _t(2, 13, 3, 4, dtype=dtype, seed=1)
    p = _t(2, 13, 3, 5, dtype=dtype, seed=2)
    torch.library.opcheck(ops.band_qk, (q, k, 2, 2, [1, 2, 1], -1.5))
    torch.library.opcheck(ops.band_pv, (p, k, 2, 2, [1, 2, 1]))
    torch.library.opcheck(ops.band_tpv, (p, q, 2, 2, [1, 2, 1]))
    torch.library.opcheck(ops.band_qk, (q, k, 4, 0, [1, 1, 1], 0.0))


def test_torch_compile_has_no_graph_break():
    def attention(q, k, v):
        s = lt.sliding_window_qk(q, k, 4, padding_value=float("-inf"))
        return lt.sliding_window_pv(torch.softmax(s, -1), v, 4)

    q, k, v = (_t(2, 40, 2, 8, dtype=torch.float32, grad=False, seed=i) for i in range(3))
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), attention(q, k, v))
    explanation = torch._dynamo.explain(attention)(q, k, v)
    assert explanation.graph_break_count == 0


BAD_INPUTS = [
    # (call, exception, text that must appear)
    (lambda q, k, p: lt.sliding_window_qk(q[0], k[0], 2), ValueError, "4 dimensions"),
    (lambda q, k, p: lt.sliding_window_qk(q, k[:, :5], 2), ValueError, "(batch, seq_len, heads)"),
    (lambda q, k, p: lt.sliding_window_qk(q, k[..., :3], 2), ValueError, "head size"),
    (lambda q, k, p: lt.sliding_window_qk(q, k.double(), 2), TypeError, "same dtype"),
    (lambda q, k, p: lt.sliding_window_qk(q.int(), k.int(), 2), TypeError, "floating"),
    (lambda q, k, p: lt.sliding_window_qk(q, k, -1), ValueError, "window must be >= 0"),
    (lambda q, k, p: lt.sliding_window_qk(q, k, 2.5), TypeError, "window must be an int"),
    (lambda q, k, p: lt.sliding_window_qk(q, k, 2, [1, 2]), ValueError, "one entry per head"),
    (lambda q, k, p: lt.sliding_window_qk(q, k, 2, [1, 0, 1]), ValueError, "dilation must be >= 1"),
    (lambda q, k, p: lt.sliding_window_qk(q, k, 2, torch.tensor([1.0, 2.0, 1.0])), TypeError,
     "integers"),
    (lambda q, k, p: lt.sliding_window_qk(q, k, 2, 1, autoregressive=1), TypeError, "bool"),
    (lambda q, k, p: lt.sliding_window_pv(p, k, 3), ValueError, "C=7 columns"),
    (lambda q, k, p: lt.sliding_window_pv(p, k, 2, autoregressive=True), ValueError, "C=3"),
    (lambda q, k, p: lt.sliding_window_pv_transposed(p[..., :4], k, 2), ValueError, "C=5"),
    (lambda q, k, p: lt.diagonaled_mm(p, k, 2, 1, True, padding=-1.0), ValueError, "padding"),
    (lambda q, k, p: lt.sliding_window_qk(q, k.to("meta"), 2), ValueError, "same device"),
    (lambda q, k, p: lt.sliding_window_qk(q, "k", 2), TypeError, "torch.Tensor"),
    (lambda q, k, p: lt.sliding_window_qk(q, k, 2, padding_value=2 ** 1100), ValueError,
     "must fit a float64"),
]


@pytest.mark.parametrize("call,exc,text", BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_error(call, exc, text):
    q, k, p = torch.randn(2, 9, 3, 4), torch.randn(2, 9, 3, 4), torch.randn(2, 9, 3, 5)
    with pytest.raises(exc) as info:
        call(q, k, p)
    assert text in str(info.value)


def test_import_does_not_import_the_tvm_compiler():
    code = "import sys, longformer_tvm; print('tvm' in sys.modules, 'tvm_kernels' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_call_loads_kernels_without_the_compiler():
    code = ("import sys, torch, longformer_tvm as lt; "
            "lt.sliding_window_qk(torch.randn(1, 8, 1, 4), torch.randn(1, 8, 1, 4), 2); "
            "import json; print(json.dumps(lt.backend_info()['loaded'])); print('tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded_line, tvm_line = out.stdout.strip().splitlines()[-2:]
    assert "cpu/float32" in json.loads(loaded_line)
    assert tvm_line == "False"


def test_backend_info_names_the_library_and_its_isa():
    lt.sliding_window_qk(torch.randn(1, 8, 1, 4), torch.randn(1, 8, 1, 4), 2)
    info = lt.backend_info()
    assert info["mode"] == "auto"
    path = info["loaded"]["cpu/float32"]
    usable = [c for c in info["available"]["cpu/float32"] if c["usable"]]
    assert path in [c["file"] for c in usable]


def test_missing_library_is_an_error_that_says_how_to_build(monkeypatch, tmp_path):
    private_registry(monkeypatch, [])
    monkeypatch.setenv("LONGFORMER_TVM_CACHE", str(tmp_path))
    with pytest.raises(lt.KernelNotAvailableError) as info:
        lt.sliding_window_qk(torch.randn(1, 8, 1, 4), torch.randn(1, 8, 1, 4), 2)
    assert "python build_kernels.py build --target cpu --dtype float32" in str(info.value)


def test_unsupported_dtype_on_cpu_is_an_error_not_a_crash():
    with pytest.raises(lt.KernelNotAvailableError) as info:
        lt.sliding_window_qk(torch.randn(1, 8, 1, 4).half(), torch.randn(1, 8, 1, 4).half(), 2)
    assert "float16" in str(info.value)


def test_reference_backend_is_explicit(monkeypatch):
    q, k = torch.randn(1, 30, 2, 4), torch.randn(1, 30, 2, 4)
    compiled = lt.sliding_window_qk(q, k, 3, [1, 2])
    monkeypatch.setenv("LONGFORMER_TVM_BACKEND", "reference")
    torch.testing.assert_close(lt.sliding_window_qk(q, k, 3, [1, 2]), compiled)
    monkeypatch.setenv("LONGFORMER_TVM_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LONGFORMER_TVM_BACKEND"):
        lt.sliding_window_qk(q, k, 3)
