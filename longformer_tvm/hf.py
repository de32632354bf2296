"""transformers integration: run a Longformer model's self-attention on the band kernels.

::

    from transformers import LongformerModel
    from longformer_tvm.hf import use_tvm_attention, restore_hf_attention, tvm_attention

    model = LongformerModel.from_pretrained("allenai/longformer-base-4096")
    use_tvm_attention(model)          # every layer's attention.self is now ours, same Parameters
    out = model(input_ids, global_attention_mask=g)
    restore_hf_attention(model)       # transformers' modules back

    with tvm_attention(model):        # or scoped
        out = model(input_ids)

LED (``LEDModel``, ``LEDForConditionalGeneration``) swaps the same way: its encoder's
``longformer_self_attn`` is Longformer's self-attention under another name.

The swap replaces each ``LongformerAttention.self`` (transformers' ``LongformerSelfAttention``) by
:class:`HFLongformerSelfAttention`, which holds the *same* ``query``/``key``/``value`` and
``query_global``/``key_global``/``value_global`` ``nn.Linear`` modules under the same names: the
state dict, the parameter order and any optimizer built before or after the swap are unaffected.
It accepts transformers' call (the -10000/0/+10000-style ``attention_mask`` and the
``is_index_masked``/``is_index_global_attn``/``is_global_attn`` arguments) and returns transformers'
tuple: ``(attn_output (B, N, E),)``, plus ``attn_probs (B, N, H, G + 2w + 1)`` when
``output_attentions``, plus ``global_attn_probs (B, H, G, N)`` when also any token is global.

Results equal transformers' to float32 rounding (the band is computed without transformers'
padding to a multiple of the window and without its chunked copies). One deliberate difference: a
float64 model's softmax runs in float64 here, where transformers rounds it through float32.

transformers is an optional dependency (``pip install longformer-tvm[hf]``); it is imported only
when a function here is called, never by ``import longformer_tvm``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from .attention import _PROJECTIONS, LongformerSelfAttention

logger = logging.getLogger("longformer_tvm")

__all__ = ["HFLongformerSelfAttention", "use_tvm_attention", "restore_hf_attention", "tvm_attention",
           "is_tvm_attention"]

_ORIGINAL = "_hf_original"


def _hf_classes() -> tuple[type, ...]:
    """transformers' Longformer self-attention classes: Longformer's and LED's encoder's (a copy
    of it with the same projections, masks and call)."""
    try:
        from transformers.models.longformer import modeling_longformer
    except ImportError as exc:
        raise ImportError("longformer_tvm.hf needs transformers: pip install longformer-tvm[hf]") from exc
    classes = [modeling_longformer.LongformerSelfAttention]
    try:
        from transformers.models.led import modeling_led
        classes.append(modeling_led.LEDEncoderSelfAttention)
    except (ImportError, AttributeError):  # a transformers without LED: Longformer only
        pass
    return tuple(classes)


class HFLongformerSelfAttention(LongformerSelfAttention):
    """Our layer with transformers' ``LongformerSelfAttention`` interface (forward signature,
    returned tuple, ``layer_id``, ``one_sided_attn_window_size``, ``config``)."""

    def _configure(self, embed_dim, num_heads, window, dilation, autoregressive, dropout,
                   layer_id: int = 0, config=None) -> None:
        super()._configure(embed_dim, num_heads, window, dilation, autoregressive, dropout)
        self.layer_id = layer_id
        self.config = config

    @property
    def one_sided_attn_window_size(self) -> int:
        return self.window

    @classmethod
    def from_hf(cls, module: nn.Module) -> HFLongformerSelfAttention:
        """Wrap a transformers ``LongformerSelfAttention`` (or LED's ``LEDEncoderSelfAttention``),
        sharing its projection modules."""
        if not isinstance(module, _hf_classes()):
            raise TypeError(f"HFLongformerSelfAttention.from_hf: module must be a transformers "
                            f"LongformerSelfAttention or LEDEncoderSelfAttention, got "
                            f"{type(module).__name__}")
        ours = cls.from_projections(
            module.query, module.key, module.value, module.query_global, module.key_global,
            module.value_global, num_heads=module.num_heads, window=module.one_sided_attn_window_size,
            dropout=module.dropout, layer_id=module.layer_id, config=module.config)
        ours.train(module.training)
        # Kept outside the module tree (no second copy of the parameters in state_dict()).
        object.__setattr__(ours, _ORIGINAL, module)
        return ours

    def to_hf(self) -> nn.Module:
        """The transformers module this one replaced (same projections), in our training mode."""
        original = self.__dict__.get(_ORIGINAL)
        if original is None:
            raise ValueError("HFLongformerSelfAttention.to_hf: this layer was not made by from_hf, so "
                             "there is no transformers module to return")
        for name in _PROJECTIONS:  # whatever the projections are now (e.g. wrapped), not a stale copy
            setattr(original, name, getattr(self, name))
        original.train(self.training)
        original.dropout = self.dropout
        return original

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                is_index_masked: torch.Tensor | None = None,
                is_index_global_attn: torch.Tensor | None = None, is_global_attn: bool | None = None,
                output_attentions: bool = False, **kwargs):
        """transformers' call: hidden_states (B, N, E); attention_mask (B, N) negative = padding,
        0 = local, positive = global (only read when the ``is_index_*`` masks are not given)."""
        self._check_hidden(hidden_states)
        if is_index_masked is None and attention_mask is not None:
            is_index_masked = attention_mask < 0
        if is_index_global_attn is None and attention_mask is not None:
            is_index_global_attn = attention_mask > 0
        if is_global_attn is False:
            is_index_global_attn = None
        out = self.attend(hidden_states, is_index_masked, is_index_global_attn, output_attentions)
        outputs = (out.output,)
        if output_attentions:
            outputs += (out.attn_probs,)
            if out.global_attn_probs is not None:
                outputs += (out.global_attn_probs,)
        return outputs


def _swappable(model: nn.Module, kind: type) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, kind):
                yield parent, name, child


def _check_model(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module (a transformers Longformer model), "
                        f"got {type(model).__name__}")


def use_tvm_attention(model: nn.Module) -> nn.Module:
    """Swap every transformers Longformer self-attention inside ``model`` for ours, in place.

    Works on ``LongformerModel`` and every ``LongformerFor*`` model, and on ``LEDModel`` /
    ``LEDForConditionalGeneration`` (any module tree holding transformers'
    ``LongformerSelfAttention`` or LED's ``LEDEncoderSelfAttention``: the encoder's self-attention;
    LED's decoder attention is dense and stays transformers'). Parameters are shared, not copied; training mode
    and dropout carry over. Layers already swapped are left alone. Returns ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` holds no Longformer self-attention at all.
    """
    _swap(model)
    return model


def _swap(model: nn.Module) -> list[tuple[nn.Module, str]]:
    _check_model("use_tvm_attention", model)
    todo = list(_swappable(model, _hf_classes()))
    if not todo and not is_tvm_attention(model):
        raise ValueError(f"use_tvm_attention: {type(model).__name__} contains no transformers "
                         "LongformerSelfAttention (nor LED's LEDEncoderSelfAttention); pass a "
                         "LongformerModel, LongformerFor*, LEDModel or LEDFor* model")
    for parent, name, child in todo:
        setattr(parent, name, HFLongformerSelfAttention.from_hf(child))
    logger.info("use_tvm_attention: swapped %d self-attention layer(s) of %s", len(todo),
                type(model).__name__)
    return [(parent, name) for parent, name, _ in todo]


def restore_hf_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`use_tvm_attention`: put transformers' modules back (same Parameters). Returns model."""
    _check_model("restore_hf_attention", model)
    todo = [t for t in _swappable(model, HFLongformerSelfAttention) if _ORIGINAL in t[2].__dict__]
    for parent, name, child in todo:
        setattr(parent, name, child.to_hf())
    logger.info("restore_hf_attention: restored %d self-attention layer(s) of %s", len(todo),
                type(model).__name__)
    return model


def is_tvm_attention(model: nn.Module) -> bool:
    """True when some self-attention in ``model`` runs on our kernels."""
    _check_model("is_tvm_attention", model)
    return any(isinstance(m, HFLongformerSelfAttention) for m in model.modules())


@contextlib.contextmanager
def tvm_attention(model: nn.Module) -> Iterator[nn.Module]:
    """``with tvm_attention(model): ...`` -- our attention inside the block; on exit the layers
    this call swapped get transformers' modules back (layers swapped before stay ours)."""
    swapped = _swap(model)
    try:
        yield model
    finally:
        for parent, name in swapped:
            child = getattr(parent, name)
            if isinstance(child, HFLongformerSelfAttention):
                setattr(parent, name, child.to_hf())
