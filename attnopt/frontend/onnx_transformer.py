"""Lowerings of transformer ops: attention into ``scaled_dot_product_attention`` calls, and the
other ops onnxruntime's transformer optimizer fuses (layer norms with skip or embeddings, GELUs).

Entry point: :data:`LOWERINGS`, merged into :mod:`attnopt.frontend.onnx_ops`' table.

* ONNX ``Attention`` (opset 23; torch's dynamo exporter emits it for SDPA): 3-D inputs are split
  into heads, ``is_causal`` (top-left aligned, as torch's SDPA) is passed on, or folded into the
  mask when there is one; soft-capping is decomposed into the standard ops detection matches.
* ``com.microsoft.Attention`` (onnxruntime's transformer optimizer): the packed QKV projection
  becomes three ``linear`` ops; ``mask_index`` (end positions ``[B]`` or a 0/1 mask
  ``[B, L]``/``[B, S, L]``) and ``unidirectional`` become one additive mask, as onnxruntime
  computes it: ``mask_filter_value`` at padded keys, ``-inf`` at future keys.
* ``com.microsoft.MultiHeadAttention``: separate 3-D query/key/value, optional packed bias,
  ``key_padding_mask`` as above, ``attention_bias`` added to the mask.
* ``SkipLayerNormalization``, ``EmbedLayerNormalization`` (its mask index counts the mask's ones
  per row, as onnxruntime does), ``BiasGelu``, ``FastGelu`` and contrib ``Gelu``: adds,
  embedding lookups, ``layer_norm`` and ``gelu``.

Forms these do not cover (past key/values, rotary, packed layouts, extra outputs that are read)
raise :class:`~attnopt.frontend.onnx_ops.Unsupported`, so the node runs as it is in onnxruntime.
``fuse-attention`` then turns each SDPA call into the IR ``attention`` op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from attnopt.frontend.onnx_import import Importer, Operand
from attnopt.frontend.onnx_ops import Unsupported, attributes, const, shape_of
from attnopt.ir.core_ops import CastAttrs, DimAttrs, PermuteAttrs, ScalarOperandAttrs, ShapeAttrs

_SDPA = "aten.scaled_dot_product_attention.default"


def _heads_first(im: Importer, x: Operand, heads: int) -> Operand:
    """``[B, S, H*D]`` -> ``[B, H, S, D]``."""
    batch, length, hidden = shape_of(x)
    if hidden % heads:
        raise Unsupported(f"hidden size {hidden} is not a multiple of {heads} heads")
    x = im.op("reshape", [x], ShapeAttrs(shape=(batch, length, heads, hidden // heads)))
    return im.op("permute", [x], PermuteAttrs(dims=(0, 2, 1, 3)))


def _heads_last(im: Importer, y: Operand) -> Operand:
    """``[B, H, S, D]`` -> ``[B, S, H*D]``."""
    batch, heads, length, dim = shape_of(y)
    y = im.op("permute", [y], PermuteAttrs(dims=(0, 2, 1, 3)))
    return im.op("reshape", [y], ShapeAttrs(shape=(batch, length, heads * dim)))


def _sdpa(
    im: Importer, q: Operand, k: Operand, v: Operand, mask: Operand, **options: Any
) -> Operand:
    options.setdefault("enable_gqa", shape_of(q)[1] != shape_of(k)[1])
    return im.aten(_SDPA, [q, k, v, mask, 0.0, options.pop("is_causal", False)], options)


# --- ONNX Attention (opset 23) -----------------------------------------------------------------
def _onnx_attention(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    q, k, v, mask, past_key, past_value, nonpad = (list(ins) + [None] * 7)[:7]
    if past_key is not None or past_value is not None or nonpad is not None:
        raise Unsupported("past key/values")
    if any(node.output[1:]):
        raise Unsupported("present key/values or QK outputs are read")
    attrs = attributes(node)
    three_d = len(shape_of(q)) == 3
    if three_d:
        q = _heads_first(im, q, int(attrs["q_num_heads"]))
        k = _heads_first(im, k, int(attrs["kv_num_heads"]))
        v = _heads_first(im, v, int(attrs["kv_num_heads"]))
    if attrs.get("qk_matmul_output_mode", 0) and any(node.output[3:]):
        raise Unsupported("qk_matmul_output_mode")
    q_len, kv_len = shape_of(q)[2], shape_of(k)[2]
    if mask is not None and shape_of(mask)[-1] != kv_len:
        raise Unsupported("a mask shorter than the keys")
    causal = bool(attrs.get("is_causal", 0))
    scale = attrs.get("scale") or 1.0 / math.sqrt(shape_of(q)[-1])
    softcap = float(attrs.get("softcap", 0.0))
    if causal and (mask is not None or softcap):
        # The spec's causal rule is top-left aligned (as torch's SDPA): a constant tril.
        tril = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
        if mask is None:
            mask = tril
        elif mask.dtype == torch.bool:
            mask = im.aten("aten.logical_and.default", [mask, tril])
        else:
            mask = im.op("where", [tril, mask, torch.tensor(-math.inf, dtype=mask.dtype)])
        causal = False
    if softcap:
        out = _softcapped(im, q, k, v, mask, float(scale), softcap)
    else:
        out = _sdpa(im, q, k, v, mask, is_causal=causal, scale=float(scale))
    return [_heads_last(im, out) if three_d else out]


def _softcapped(
    im: Importer, q: Operand, k: Operand, v: Operand, mask: Operand, scale: float, softcap: float
) -> Operand:
    """``softmax(softcap * tanh(scale * q k^T / softcap) + mask) v`` in standard ops."""
    groups = shape_of(q)[1] // shape_of(k)[1]
    if groups > 1:
        k = im.aten("aten.repeat_interleave.self_int", [k, groups, 1])
        v = im.aten("aten.repeat_interleave.self_int", [v, groups, 1])
    scores = im.op("matmul", [q, im.op("transpose", [k])])
    scores = im.op("mul", [scores], ScalarOperandAttrs(scalar=scale))
    scores = im.op("div", [scores], ScalarOperandAttrs(scalar=softcap))
    scores = im.op("mul", [im.op("tanh", [scores])], ScalarOperandAttrs(scalar=softcap))
    if mask is not None and mask.dtype == torch.bool:
        scores = im.op("where", [mask, scores, torch.tensor(-math.inf, dtype=scores.dtype)])
    elif mask is not None:
        scores = im.op("add", [scores, mask], ScalarOperandAttrs())
    return im.op("matmul", [im.op("softmax", [scores], DimAttrs(dim=-1)), v])


# --- onnxruntime contrib attention -------------------------------------------------------------
def _visible_keys(
    im: Importer, mask_index: Operand, batch: int, q_len: int, kv_len: int
) -> Operand:
    """onnxruntime's key mask as bool ``[B, 1, 1|S, L]`` (True: the key is visible)."""
    shape = shape_of(mask_index)
    if shape == (batch,):  # end positions: keys before them are visible (right padding)
        positions = torch.arange(kv_len, dtype=mask_index.dtype).reshape(1, kv_len)
        ends = im.op("unsqueeze", [mask_index], DimAttrs(dim=1))
        visible = im.aten("aten.lt.Tensor", [positions, ends])
        return im.op("reshape", [visible], ShapeAttrs(shape=(batch, 1, 1, kv_len)))
    if shape == (batch, kv_len):
        visible = im.aten("aten.gt.Scalar", [mask_index, 0])
        return im.op("reshape", [visible], ShapeAttrs(shape=(batch, 1, 1, kv_len)))
    if shape == (batch, q_len, kv_len):
        visible = im.aten("aten.gt.Scalar", [mask_index, 0])
        return im.op("unsqueeze", [visible], DimAttrs(dim=1))
    raise Unsupported(f"mask_index of shape {list(shape)}")


def _contrib_mask(
    im: Importer, attrs: dict, mask_index: Operand, bias: Operand, q: Operand, k: Operand
) -> Operand:
    """The additive mask of a contrib attention: ``mask_filter_value`` where hidden, + bias."""
    batch, _, q_len, _ = shape_of(q)
    kv_len = shape_of(k)[2]
    fill = float(attrs.get("mask_filter_value", -10000.0))
    zero, hidden = torch.tensor(0.0, dtype=q.dtype), torch.tensor(fill, dtype=q.dtype)
    mask = bias
    # As onnxruntime computes it: padding adds mask_filter_value (a query whose keys are all
    # padding still attends, uniformly), the causal rule hides future keys entirely (-inf).
    if mask_index is not None:
        visible = _visible_keys(im, mask_index, batch, q_len, kv_len)
        padding = im.op("where", [visible, zero, hidden])
        mask = padding if mask is None else im.op("add", [padding, mask], ScalarOperandAttrs())
    if attrs.get("unidirectional", 0):
        if q_len != kv_len:
            raise Unsupported("unidirectional with past keys")
        causal = torch.zeros(q_len, kv_len, dtype=q.dtype).masked_fill(
            ~torch.ones(q_len, kv_len, dtype=torch.bool).tril(), -math.inf
        )
        mask = causal if mask is None else im.op("add", [mask, causal], ScalarOperandAttrs())
    return mask


def _ms_attention(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x, weights, bias, mask_index, past, attention_bias, past_len = (list(ins) + [None] * 7)[:7]
    attrs = attributes(node)
    if past is not None or past_len is not None or attrs.get("do_rotary", 0):
        raise Unsupported("past state or rotary embeddings")
    if any(node.output[1:]) or len(shape_of(x)) != 3:
        raise Unsupported("present output read, or a packed input")
    heads = int(attrs["num_heads"])
    weight = const(weights, "weights")
    sizes = list(attrs.get("qkv_hidden_sizes") or [weight.shape[1] // 3] * 3)
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    projected = []
    for index in range(3):
        lo, hi = bounds[index], bounds[index + 1]
        w = im.mark_weight(weight[:, lo:hi].t().contiguous(), f"{node.input[1]}.{'qkv'[index]}")
        b = None if bias is None else const(bias, "bias")[lo:hi].contiguous()
        if b is not None:
            im.mark_weight(b, f"{node.input[2]}.{'qkv'[index]}")
        projected.append(_heads_first(im, im.op("linear", [x, w, b]), heads))
    q, k, v = projected
    mask = _contrib_mask(im, attrs, mask_index, attention_bias, q, k)
    scale = attrs.get("scale") or 1.0 / math.sqrt(shape_of(q)[-1])
    return [_heads_last(im, _sdpa(im, q, k, v, mask, scale=float(scale)))]


def _ms_multi_head_attention(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    q, k, v, bias, key_padding, attention_bias, past_k, past_v = (list(ins) + [None] * 8)[:8]
    attrs = attributes(node)
    if any(x is not None for x in ins[6:]) or any(node.output[1:]):
        raise Unsupported("past key/values")
    if k is None or v is None or any(len(shape_of(x)) != 3 for x in (q, k, v)):
        raise Unsupported("packed query/key/value layouts")
    heads = int(attrs["num_heads"])
    if bias is not None:
        b = const(bias, "bias")
        widths = [shape_of(q)[-1], shape_of(k)[-1], shape_of(v)[-1]]
        starts = [0, widths[0], widths[0] + widths[1]]
        q, k, v = (
            im.op("add", [x, b[s : s + w].contiguous()], ScalarOperandAttrs())
            for x, s, w in zip((q, k, v), starts, widths)
        )
    q, k, v = (_heads_first(im, x, heads) for x in (q, k, v))
    mask = _contrib_mask(im, attrs, key_padding, attention_bias, q, k)
    scale = attrs.get("scale") or 1.0 / math.sqrt(shape_of(q)[-1])
    return [_heads_last(im, _sdpa(im, q, k, v, mask, scale=float(scale)))]


# --- onnxruntime contrib ops around attention -------------------------------------------------
def _skip_layer_norm(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x, skip, gamma, beta, bias = (list(ins) + [None] * 5)[:5]
    if any(node.output[1:3]):
        raise Unsupported("SkipLayerNormalization's mean/inv_std outputs are used")
    total = im.op("add", [x, skip], ScalarOperandAttrs())
    if bias is not None:
        total = im.op("add", [total, bias], ScalarOperandAttrs())
    eps = float(attributes(node).get("epsilon", 1e-12))
    hidden = [shape_of(x)[-1]]
    out = im.aten("aten.layer_norm.default", [total, hidden, gamma, beta, eps])
    return [out, None, None, total]


def _embed_layer_norm(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    ids, segments, words, positions, segment_table, gamma, beta, mask, position_ids = (
        list(ins) + [None] * 9
    )[:9]
    wants_index = len(node.output) > 1 and bool(node.output[1])
    if wants_index and (mask is None or attributes(node).get("mask_index_type", 1) != 1):
        raise Unsupported("a mask index without a mask, or another mask index type")

    def lookup(table: Operand, index: Operand) -> Operand:
        index = im.op("cast", [index], CastAttrs(dtype=torch.int64))
        return im.aten("aten.index.Tensor", [table, [index]])

    if position_ids is None:
        position_ids = torch.arange(shape_of(ids)[1]).reshape(1, -1)
    total = im.op(
        "add", [lookup(words, ids), lookup(positions, position_ids)], ScalarOperandAttrs()
    )
    if segments is not None and segment_table is not None:
        total = im.op("add", [total, lookup(segment_table, segments)], ScalarOperandAttrs())
    eps = float(attributes(node).get("epsilon", 1e-12))
    hidden = [shape_of(words)[-1]]
    out = im.aten("aten.layer_norm.default", [total, hidden, gamma, beta, eps])
    mask_index = None
    if mask is not None and wants_index:
        # onnxruntime's mask index: per row, how many mask entries are 1.
        ones = im.op("cast", [im.aten("aten.eq.Scalar", [mask, 1])], CastAttrs(dtype=torch.int32))
        mask_index = im.aten("aten.sum.dim_IntList", [ones, [1], False], {"dtype": torch.int32})
    return [out, mask_index, total]


def _bias_gelu(approximate: str) -> Callable:
    def lower(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
        x = ins[0]
        if len(ins) > 1 and ins[1] is not None:
            x = im.op("add", [x, ins[1]], ScalarOperandAttrs())
        return [im.aten("aten.gelu.default", [x], {"approximate": approximate})]

    return lower


LOWERINGS = {
    ("", "Attention"): _onnx_attention,
    ("com.microsoft", "Attention"): _ms_attention,
    ("com.microsoft", "MultiHeadAttention"): _ms_multi_head_attention,
    ("com.microsoft", "SkipLayerNormalization"): _skip_layer_norm,
    ("com.microsoft", "EmbedLayerNormalization"): _embed_layer_norm,
    ("com.microsoft", "BiasGelu"): _bias_gelu("none"),
    ("com.microsoft", "Gelu"): _bias_gelu("none"),
    ("com.microsoft", "FastGelu"): _bias_gelu("tanh"),
}
