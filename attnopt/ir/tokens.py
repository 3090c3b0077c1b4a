"""Token packing ops: run token-wise work on the real tokens of a padded batch only.

Entry points: :class:`TokenIndexAttrs`, the ops ``token_index``, ``pack`` and ``unpack``.

* ``token_index(valid) -> (indices, segments)``: ``valid`` is a ``[B, S]`` bool (True = a real
  token); ``indices`` (int64 ``[T]``) are the flat positions ``b * S + s`` of the real tokens in
  order, ``segments`` (int64 ``[1, T]``) the batch row of each, i.e. the document of each packed
  token (attention over the packed tokens is attention within each row). ``T`` is a size known
  only at run time: the symbol named by the attributes, bound from ``indices`` by the program.
* ``pack(x, indices, valid) -> [T, *rest]`` for ``x`` of shape ``[B, S, *rest]`` (leading
  size-1 dims broadcast: a ``[1, S, D]`` position embedding packs like ``[B, S, D]``).
* ``unpack(x, indices, valid) -> [B, S, *rest]``: the packed rows back in place, zeros at the
  padded positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnopt.ir.ops import OpDef, register_op
from attnopt.ir.types import TensorType, Type

__all__ = ["TokenIndexAttrs", "pack_tokens", "token_index", "unpack_tokens"]


@dataclass(frozen=True)
class TokenIndexAttrs:
    """``token_index``: ``symbol`` names the number of real tokens (bound at run time)."""

    symbol: str = "ntok"


def token_index(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and batch rows of the real tokens of a ``[B, S]`` bool mask."""
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"token_index takes a [B, S] bool mask, got {tuple(valid.shape)}")
    indices = valid.reshape(-1).nonzero().squeeze(1)
    segments = torch.div(indices, valid.shape[1], rounding_mode="floor").unsqueeze(0)
    return indices, segments


def pack_tokens(x: torch.Tensor, indices: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Rows ``indices`` of ``x`` (``[B|1, S|1, *rest]``) flattened to ``[B * S, *rest]``."""
    rest = tuple(x.shape[2:])
    flat = x.expand(batch, seq, *rest).reshape(batch * seq, *rest)
    return flat.index_select(0, indices)


def unpack_tokens(x: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[T, *rest]`` scattered back to ``[B, S, *rest]`` with zeros at padded positions."""
    batch, seq = valid.shape
    out = x.new_zeros((batch * seq, *x.shape[1:]))
    out.index_copy_(0, indices, x)
    return out.view(batch, seq, *x.shape[1:])


def _index_impl(inputs: list[Any], attrs: TokenIndexAttrs) -> tuple[torch.Tensor, torch.Tensor]:
    return token_index(inputs[0])


def _index_infer(types: list[Type | None], attrs: TokenIndexAttrs) -> list[Type]:
    return [
        TensorType((attrs.symbol,), torch.int64),
        TensorType((1, attrs.symbol), torch.int64),
    ]


def _pack_impl(inputs: list[Any], attrs: Any) -> torch.Tensor:
    x, indices, valid = inputs
    return pack_tokens(x, indices, *valid.shape)


def _pack_infer(types: list[Type | None], attrs: Any) -> list[Type]:
    x, indices = types[0], types[1]
    assert isinstance(x, TensorType) and isinstance(indices, TensorType)
    return [TensorType((indices.shape[0], *x.shape[2:]), x.dtype)]


@dataclass(frozen=True)
class NoAttrs:
    """Ops without attributes."""


def _unpack_impl(inputs: list[Any], attrs: Any) -> torch.Tensor:
    return unpack_tokens(*inputs)


def _unpack_infer(types: list[Type | None], attrs: Any) -> list[Type]:
    x, valid = types[0], types[2]
    assert isinstance(x, TensorType) and isinstance(valid, TensorType)
    return [TensorType((*valid.shape, *x.shape[1:]), x.dtype)]


register_op(
    OpDef(
        "token_index",
        TokenIndexAttrs,
        _index_impl,
        num_outputs=2,
        infer=_index_infer,
    )
)
register_op(OpDef("pack", NoAttrs, _pack_impl, infer=_pack_infer))
register_op(OpDef("unpack", NoAttrs, _unpack_impl, infer=_unpack_infer))
