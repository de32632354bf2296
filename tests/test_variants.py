"""Per-window variants: a CPU library holds several compiled versions of a product, and each call
takes the one its band's width selects from the manifest's dispatch table (``variants``).

Every variant of the libraries this machine loads is checked against the dense float64 oracle at
a band of its own class, through the public functions (so through the dispatch), and the table is
checked against the rule it states.
"""

from __future__ import annotations

import math

import pytest
import torch

import longformer_tvm as lt
from longformer_tvm import _contract, _fused, backends, reference
from longformer_tvm._checks import normalize_band
from longformer_tvm._registry import Dispatch

from .oracle import assert_close_to_oracle, dense_attention, dense_pv, dense_qk, dense_tpv


def _rows(functions: dict, product: str) -> list:
    fn = functions[product]
    return fn.rows if isinstance(fn, Dispatch) else [(None, "(one function)", fn)]


def test_dispatch_takes_the_first_row_whose_bound_holds_the_band():
    calls = []
    rows = [(65, "narrow", lambda *a: calls.append(("narrow", a))),
            (257, "medium", lambda *a: calls.append(("medium", a))),
            (None, "wide", lambda *a: calls.append(("wide", a)))]
    d = Dispatch("qk", rows)
    cases = {(16, 16): "narrow", (32, 32): "narrow", (33, 32): "medium", (64, 0): "narrow",
             (128, 128): "medium", (129, 128): "wide", (256, 0): "medium", (0, 0): "narrow",
             (512, 512): "wide"}
    for (left, right), want in cases.items():
        assert d.choose(left, right)[0] == want, (left, right)
    d("q", "k", "out", 40, 40, 1, 0.0)  # called like the kernel: left, right at WINDOW_ARG
    assert calls == [("medium", ("q", "k", "out", 40, 40, 1, 0.0))]
    fused = Dispatch("attention_backward", rows)
    fused(*range(11), 1, 2, 1, 0.5)
    assert calls[-1][0] == "narrow"


def test_window_classes_cover_every_band_in_order():
    bounds = [most for _, most, _ in _contract.WINDOW_CLASSES]
    assert bounds[-1] is None and bounds[:-1] == sorted(bounds[:-1])
    for name, most, w in _contract.WINDOW_CLASSES:
        assert _contract.window_class(2 * w + 1) == name  # a class's own window is in it
        if most is not None:
            assert _contract.window_class(most) == name and _contract.window_class(most + 1) != name
    with pytest.raises(ValueError, match="window class must be one of"):
        _contract.class_shape("tiny")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_dispatch_table_is_the_manifests(dtype):
    functions = backends.functions("cpu", dtype)
    entry = backends.chosen_entries()[f"cpu/{dtype}"]
    table = entry.info.get("variants")
    assert table, f"{entry.path}: the manifest entry has no dispatch table (rebuild it)"
    for product, rows in table.items():
        assert [r["class"] for r in rows] == [c for c, _, _ in _contract.WINDOW_CLASSES]
        assert [(m, n) for m, n, _ in _rows(functions, product)] == [
            (r["max_columns"], r["function"]) for r in rows]
        assert rows[-1]["function"] == entry.info["functions"][product]


def _windows(dtype: str, product: str) -> list[tuple[int, str]]:
    """One (window, symbol) per distinct variant: the class's largest window (its own at the top)."""
    rows, out, seen = _rows(backends.functions("cpu", dtype), product), [], set()
    lower = 0
    for most, name, _ in rows:
        w = (most - 1) // 2 if most is not None else max(lower + 1, 40)
        lower = (most - 1) // 2 if most is not None else lower
        if name not in seen:
            seen.add(name)
            out.append((w, name))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("product", ["qk", "pv", "tpv"])
def test_every_variant_computes_the_band_product(dtype, product):
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    fn = backends.functions("cpu", dtype)[product]
    for w, symbol in _windows(dtype, product):
        n, h, d = 3 * w + 37, 2, 16
        band = normalize_band("test", w, [1, 2], False, h)
        if isinstance(fn, Dispatch):
            assert fn.choose(band.left, band.right)[0] == symbol
        a = torch.randn(1, n, h, d if product == "qk" else band.columns, generator=g, dtype=dt)
        b = torch.randn(1, n, h, d, generator=g, dtype=dt)
        # plain: the same product in plain PyTorch at the inputs' dtype (the tolerance's scale)
        if product == "qk":
            got, want = lt.sliding_window_qk(a, b, w, [1, 2]), dense_qk(a, b, band, 0.0)
            plain = reference.band_qk(a, b, band, 0.0)
        elif product == "pv":
            got, want = lt.sliding_window_pv(a, b, w, [1, 2]), dense_pv(a, b, band)
            plain = torch.einsum("bhij,bjhd->bihd", reference.to_dense(a, band), b)
        else:
            got, want = _tpv(a, b, band), dense_tpv(a, b, band)
            plain = torch.einsum("bhij,bihd->bjhd", reference.to_dense(a, band), b)
        assert_close_to_oracle(got, want, plain, what=f"{product} {symbol} w={w}")


def _tpv(g, x, band):
    from longformer_tvm import ops

    return ops.band_tpv(g, x, band.left, band.right, list(band.dilation))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_fused_variant_computes_the_attention(dtype):
    if not _fused.served("cpu", getattr(torch, dtype)):
        pytest.skip("no fused kernel serves here")
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1)
    fn = backends.functions("cpu", dtype)["attention"]
    for w, symbol in _windows(dtype, "attention"):
        if isinstance(fn, Dispatch):
            assert fn.choose(w, w)[0] == symbol
        n, h, d = 2 * w + 45, 2, 16
        q, k, v = (torch.randn(1, n, h, d, generator=g, dtype=dt) for _ in range(3))
        band = normalize_band("test", w, 1, False, h)
        out = lt.sliding_window_attention(q, k, v, w)
        want, _ = dense_attention(q, k, v, band, 1 / math.sqrt(d))
        plain, _ = dense_attention(q, k, v, band, 1 / math.sqrt(d), dtype=dt)
        assert_close_to_oracle(out, want, plain, what=f"attention {symbol} w={w}")


@pytest.mark.parametrize("product", ["qk", "attention"])
def test_public_calls_reach_the_variant_of_their_window(product, monkeypatch):
    """The public functions pass the band to the kernel where the dispatch reads it: a spy on each
    row sees the calls of its own class."""
    fn = backends.functions("cpu", "float32")[product]
    if not isinstance(fn, Dispatch):
        pytest.skip("this library has one function per product")
    seen = []

    def spy(name, real):
        return lambda *args: (seen.append(name), real(*args))[1]

    monkeypatch.setattr(fn, "rows", [(most, name, spy(name, real)) for most, name, real in fn.rows])
    for w in (2, 40, 130):
        seen.clear()
        x = torch.randn(1, 3 * w + 5, 2, 16)
        if product == "qk":
            lt.sliding_window_qk(x, x, w)
        else:
            lt.sliding_window_attention(x, x, x, w)
        want = next(name for most, name, _ in fn.rows if most is None or 2 * w + 1 <= most)
        assert seen and set(seen) == {want}, (w, seen)
