"""torch.compile of the layer and of a swapped transformers model: it runs, equals eager, and
breaks the graph no more often than transformers' own attention does.

Eager is the reference: the same module runs eagerly and compiled on the same inputs, in inference
(``no_grad``: eager takes the in-place softmax, the graph the functional one) and in training
(forward and backward). The house rule for tolerances: the compiled float32 result may be at most
a small multiple further from the float64 eager result than eager float32 is. Shapes are tiny,
and ``torch._dynamo.reset()`` runs between tests so that none reuses another's graphs or counts.
Inductor compiles a C++ library per kernel (about a second each on two cores), so it runs the
cases that crashed and a user runs most -- the swapped model's inference with and without global
tokens and its training with them, the layer's training at a new length -- and ``aot_eager`` (the
same tracing, autograd and functionalisation, no code generation) the other variants.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import longformer_tvm.attention as attention_module
from longformer_tvm import LongformerSelfAttention
from longformer_tvm.hf import use_tvm_attention

try:
    from transformers import LongformerConfig, LongformerModel
except ImportError:  # the swapped-model tests skip, the layer's run
    LongformerConfig = LongformerModel = None

needs_transformers = pytest.mark.skipif(LongformerModel is None,
                                        reason="needs transformers (pip install longformer-tvm[hf])")

FACTOR = 4.0  # compiled error vs float64 <= FACTOR * eager float32 error vs float64 + floor
FLOOR = 1e-6  # relative to the largest value compared (exact zeros, sums that cancel)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    padding: bool
    globals_: tuple = ()  # per sample: global positions (a padded one among them: padding wins)
    autoregressive: bool = False


N = 23  # not a multiple of the window or the dilation
PLAIN = Case("plain", False)
PADDING = Case("padding", True)
GLOBALS = Case("padding-globals", True, ((0, 9, 20), (4, 22)))
AR_GLOBALS = Case("ar-padding-globals", True, ((2, 15), (0, 1, 22)), autoregressive=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def layer_inputs(case: Case, n: int = N, seed: int = 0):
    """x (2, n, 16); mask with a hole in sample 0 and a padded tail in sample 1; global mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 16, generator=g)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 5:7] = False
    mask[1, n - 4:] = False
    glob = torch.zeros(2, n, dtype=torch.bool)
    for b, positions in enumerate(case.globals_):
        glob[b, list(positions)] = True
    return x, (mask if case.padding else None), (glob if case.globals_ else None)


def make_layer(case: Case, dilation=(1, 2)) -> LongformerSelfAttention:
    torch.manual_seed(1)
    return LongformerSelfAttention(16, 2, 3, dilation=dilation, autoregressive=case.autoregressive)


def assert_as_close_as_eager(ours, eager, ref64, what: str, scale: float | None = None) -> None:
    """Compiled float32 ``ours`` is within FACTOR x eager float32's error of the float64 result."""
    assert (ours is None) == (eager is None), what
    if eager is None:
        return
    assert ours.shape == eager.shape, what
    ref64 = ref64.detach()
    scale = float(ref64.abs().max()) if scale is None else scale
    err = float((ours.detach().double() - ref64).abs().max())
    base = float((eager.detach().double() - ref64).abs().max())
    assert err <= FACTOR * base + FLOOR * max(scale, 1.0), f"{what}: {err=:.3g}, eager's {base:.3g}"


def assert_grads_as_close_as_eager(ours: dict, eager: dict, ref64: dict) -> None:
    assert ours.keys() == eager.keys() == ref64.keys()
    scale = max(float(g.abs().max()) for g in ref64.values())  # a zero gradient is all rounding
    for name in eager:
        assert_as_close_as_eager(ours[name], eager[name], ref64[name], f"grad {name}", scale)


def grads(module: torch.nn.Module, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    out.update({name: t.grad.clone() for name, t in tensors.items()})
    return out


def explain(fn, *args):
    """(graphs, breaks, break reasons with their stacks, every break's reason with its count).

    explain's own count leaves out a break that ends an empty graph (e.g. a Logger call before any
    tensor operation); Dynamo's counters have them all."""
    counters.clear()
    result = torch._dynamo.explain(fn)(*args)
    every = {reason.splitlines()[0]: n for reason, n in counters["graph_break"].items()}
    return result.graph_count, result.graph_break_count, result.break_reasons, every


def assert_breaks_only_to_read_the_global_count(reasons) -> None:
    """Every graph break whose stack passes through this package is the read of G (a size) in
    ``LongformerSelfAttention.attend``: that is its innermost frame here."""
    package = os.path.dirname(attention_module.__file__)
    innermost = []
    for reason in reasons:
        frames = [f for f in reason.user_stack if os.path.dirname(f.filename) == package]
        if frames:
            innermost.append(frames[-1])
    assert innermost, "expected the read of G to break the graph"
    for frame in innermost:
        assert (frame.filename, frame.name) == (attention_module.__file__, "attend"), frame


# ---- the layer alone ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", [PLAIN, PADDING, GLOBALS], ids=lambda c: c.id)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_layer_traces_in_one_graph_with_debug_logging_on(case, grad):
    """One graph without global tokens; with them the only breaks are where G is read -- also
    with the package's debug logging on (a Logger call would break the graph)."""
    logger = logging.getLogger("longformer_tvm")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        layer = make_layer(case).eval()
        with torch.set_grad_enabled(grad):
            graphs, _, reasons, every = explain(layer, *layer_inputs(case))
    finally:
        logger.setLevel(level)
    if case.globals_:
        assert_breaks_only_to_read_the_global_count(reasons)
        assert set(every) == {"Unsupported Tensor.item() call with capture_scalar_outputs=False"}, every
    else:
        assert (graphs, every) == (1, {})


@pytest.mark.parametrize("case", [GLOBALS, AR_GLOBALS], ids=lambda c: c.id)
def test_compiled_layer_inference_equals_eager(case):
    """All three outputs; was ValueError "Cannot view a tensor ..." (masked_fill_ into an einsum)."""
    layer = make_layer(case).eval()
    x, mask, glob = layer_inputs(case)
    compiled = torch.compile(layer, backend="aot_eager")
    with torch.no_grad():
        eager = layer(x, mask, glob, output_attentions=True)
        ours = compiled(x, mask, glob, output_attentions=True)
        ref64 = copy.deepcopy(layer).double()(x.double(), mask, glob, output_attentions=True)
    for field in eager._fields:
        assert_as_close_as_eager(getattr(ours, field), getattr(eager, field), getattr(ref64, field), field)


@pytest.mark.parametrize("batches", [(PADDING, GLOBALS), (Case("ar-padding", True, autoregressive=True),
                                                          AR_GLOBALS)], ids=["symmetric", "autoregressive"])
def test_compiled_layer_training_equals_eager(batches):
    """Training steps on a batch without global tokens, then one with: forward and backward
    through the graph give the output and every gradient (parameters and input) as close to
    float64 as eager's."""
    layer = make_layer(batches[0]).train()
    layer64 = copy.deepcopy(layer).double()
    for case in batches:
        torch._dynamo.reset()  # static shapes, as on a first call (recompiles go dynamic)
        assert_training_step_as_eager(layer, layer64, torch.compile(layer, backend="aot_eager"), case)


def test_compiled_layer_trains_in_one_graph_at_new_lengths():
    """Without global tokens the layer is one graph (``fullgraph=True``), also after a new N
    makes Inductor recompile with a dynamic size: there the band products' fake outputs (with
    symbolic sizes FakeTensor prefers a decomposition in torch's table over ``register_fake``)
    must have the kernels' (contiguous) strides, which Inductor checks."""
    layer = make_layer(PADDING, dilation=1).train()  # one run of heads: one kernel call per product
    layer64 = copy.deepcopy(layer).double()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    for n in (N, 31):
        assert_training_step_as_eager(layer, layer64, compiled, PADDING, n)


def assert_training_step_as_eager(layer, layer64, compiled, case: Case, n: int = N) -> None:
    """One forward and backward of ``compiled`` (over ``layer``): the output and every gradient
    (parameters and input) as close to float64 (``layer64``, the same weights) as eager's."""
    x, mask, glob = layer_inputs(case, n=n, seed=n)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for module, fn, dtype in ((layer, layer, torch.float32), (layer, compiled, torch.float32),
                              (layer64, layer64, torch.float64)):
        module.zero_grad(set_to_none=True)
        xi = x.detach().to(dtype).requires_grad_()  # a new leaf per run
        out = fn(xi, mask, glob).output
        (out * weights.to(dtype)).sum().backward()
        results.append((out, grads(module, input=xi)))
    (eager, eager_grads), (ours, our_grads), (ref, ref_grads) = results
    assert_as_close_as_eager(ours, eager, ref, f"{case.id} N={n}: output")
    assert_grads_as_close_as_eager(our_grads, eager_grads, ref_grads)


def test_compiled_layer_follows_new_lengths_and_global_counts():
    """Another N and another G after the first call recompile (dynamic sizes), still as eager."""
    layer = make_layer(GLOBALS).eval()
    compiled = torch.compile(layer, backend="aot_eager")
    for n, positions in ((N, ((0, 9, 20), (4, 22))), (31, ((1,), (3, 17, 30, 8))), (40, ((2, 5), ()))):
        x, mask, glob = layer_inputs(Case("dynamic", True, positions), n=n, seed=n)
        with torch.no_grad():
            eager, ours = layer(x, mask, glob).output, compiled(x, mask, glob).output
            ref64 = copy.deepcopy(layer).double()(x.double(), mask, glob).output
        assert_as_close_as_eager(ours, eager, ref64, f"output at N={n}")


# ---- a swapped transformers model --------------------------------------------------------------
HF_N = 40  # transformers pads it to 48, a multiple of attention_window


def hf_model(swapped: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LongformerConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                              num_hidden_layers=2, attention_window=16, vocab_size=100,
                              max_position_embeddings=600, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, type_vocab_size=1)
    model = LongformerModel(config)
    return use_tvm_attention(model) if swapped else model


def hf_inputs(with_globals: bool):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (2, HF_N), generator=g)
    mask = torch.ones(2, HF_N, dtype=torch.long)
    mask[1, 30:] = 0  # a padded tail (besides transformers' own padding up to 48)
    glob = None
    if with_globals:
        glob = torch.zeros(2, HF_N, dtype=torch.long)
        glob[0, 0] = 1
        glob[1, [3, 7, 35]] = 1  # 35 is padding: it stays padding
    return ids, mask, glob


def hf_forward(model, output_attentions: bool = False):
    """(last_hidden_state, pooler_output), and with ``output_attentions`` each layer's local and
    global attention probabilities (tensors, or None)."""
    def forward(ids, mask, glob):
        out = model(ids, attention_mask=mask, global_attention_mask=glob,
                    output_attentions=output_attentions)
        if not output_attentions:
            return out.last_hidden_state, out.pooler_output
        return (out.last_hidden_state, out.pooler_output, *out.attentions,
                *(out.global_attentions or ()))
    return forward


@needs_transformers
@pytest.mark.parametrize("with_globals", [False, True], ids=["local", "globals"])
def test_compiled_hf_model_inference_equals_eager(with_globals):
    """Was InductorError KeyError 'buf1' without global tokens (the in-place softmax writing a
    graph input), ValueError "Cannot view a tensor ..." with them. With them, the attention
    probabilities are compared too."""
    model = hf_model().eval()
    args = hf_inputs(with_globals)
    with torch.no_grad():
        eager = hf_forward(model, with_globals)(*args)
        ours = torch.compile(hf_forward(model, with_globals), backend="inductor")(*args)
        ref64 = hf_forward(copy.deepcopy(model).double(), with_globals)(*args)
    assert len(ours) == len(eager) == len(ref64)
    for i, (o, e, r) in enumerate(zip(ours, eager, ref64)):
        assert_as_close_as_eager(o, e, r, f"output {i}")


@needs_transformers
@pytest.mark.parametrize("backend, batches", [("aot_eager", (False, True)), ("inductor", (True,))],
                         ids=["aot_eager-local-then-globals", "inductor-globals"])
def test_compiled_hf_model_training_equals_eager(backend, batches):
    """Training steps (forward, backward) of the compiled swapped model: the output and every
    parameter's gradient are as close to float64 as eager's, with and without global tokens."""
    model = hf_model().train()
    model64 = copy.deepcopy(model).double()
    weights = torch.randn(2, HF_N, 64, generator=torch.Generator().manual_seed(4))
    for with_globals in batches:
        torch._dynamo.reset()  # static shapes, as on a first call (recompiles go dynamic)
        compiled = torch.compile(hf_forward(model), backend=backend)
        args = hf_inputs(with_globals)
        results = []
        for module, fn in ((model, hf_forward(model)), (model, compiled), (model64, hf_forward(model64))):
            module.zero_grad(set_to_none=True)
            hidden, pooled = fn(*args)
            ((hidden * weights.to(hidden.dtype)).sum() + pooled.sum()).backward()
            results.append((hidden, grads(module)))
        (eager, eager_grads), (ours, our_grads), (ref, ref_grads) = results
        assert_as_close_as_eager(ours, eager, ref, f"{with_globals=}: last_hidden_state")
        assert_grads_as_close_as_eager(our_grads, eager_grads, ref_grads)


@needs_transformers
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_swapped_model_breaks_the_graph_as_often_as_transformers(grad):
    """Without global tokens (padding on): the same graph and break counts as transformers' own
    attention. (With global tokens transformers' attention cannot be traced at all: it asserts on
    a tensor; see the next test for ours.)"""
    args = hf_inputs(with_globals=False)
    counts = {}
    for swapped in (False, True):
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            graphs, breaks, _, every = explain(hf_forward(hf_model(swapped).eval()), *args)
        counts["ours" if swapped else "transformers"] = (graphs, breaks, sum(every.values()))
    assert counts["ours"] == counts["transformers"], counts


@needs_transformers
def test_swapped_model_with_globals_breaks_only_to_read_the_global_count():
    """(2 layers: 9 graphs, 8 breaks here, where transformers' own attention, its asserts
    stripped by ``python -O``, has 15 and 14; with them it does not trace.)"""
    _, _, reasons, _ = explain(hf_forward(hf_model().eval()), *hf_inputs(with_globals=True))
    assert_breaks_only_to_read_the_global_count(reasons)
