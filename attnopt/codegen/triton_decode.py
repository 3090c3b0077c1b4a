"""Split-K flash-decoding kernels in Triton: a few queries against a long key/value cache.

Entry points: :class:`DecodeKernelConfig`, :func:`render_decode_kernel`, :func:`decode_tile`,
:data:`MAX_DECODE_ROWS`.

In the decode phase the ordinary flash kernel (:mod:`attnopt.codegen.triton_attention`) launches
``B * Hq`` programs of a 16-row query tile holding one real row, each walking the whole cache: the
GPU is mostly idle and each key/value head is read once per query head. These kernels (Lean
Attention / flash-decoding) instead:

- group the queries of one key/value head: a program's query tile holds the ``G * Sq`` rows of
  the ``G = Hq / Hkv`` query heads sharing that kv head (row ``r`` is query head ``r // Sq``
  of the group, query position ``r % Sq``), so each K/V block is loaded once for the whole group;
- split the cache length: program ``(split, batch * kv_head)`` walks only its range of keys and
  stores its normalised partial output and log-sum-exp (base 2) in fp32 workspaces
  ``[B * Hkv, splits, R, Dv]`` and ``[B * Hkv, splits, R]``;
- merge: one program per (row, batch * kv_head) combines the partial states exactly (weights
  ``2 ** (lse_s - max lse)``) and stores the row into the ``[B, Hq, Sq, Dv]`` output.

Invariants: each split's key range starts at a multiple of ``BLOCK_N``; a split or a row that sees
no key stores ``lse = -inf`` and zeros, so rows with no visible key end as zeros (the op's rule).
Masks and biases are read per row through their broadcast strides (0 on broadcast dims); the causal
rule is bottom-right aligned. Accumulation is in fp32; fp32 inputs use IEEE dots.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass

from attnopt.codegen.triton_attention import DTYPES, MASK_KINDS, MAX_HEAD_DIM, MIN_TILE, MaskKind

#: Most query rows (``G * Sq``) one program holds: the decode kernels serve calls up to this.
MAX_DECODE_ROWS = 128


def _next_pow2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


@dataclass(frozen=True)
class DecodeKernelConfig:
    """The static description of one decode kernel pair (split + merge).

    Attributes:
        head_dim: size of q and k's last dim (up to 256; padded to a power of two).
        head_dim_v: size of v's last dim.
        causal: bottom-right aligned causal rule.
        mask_kind: ``"none"``, ``"bool"`` (True = may attend) or ``"additive"``.
        has_bias: an additive bias tensor is passed.
        gqa_group: query heads per key/value head.
        softcap: tanh soft-capping of the scaled scores, or None.
        dtype: dtype name of q, k and v.
    """

    head_dim: int
    head_dim_v: int
    causal: bool = False
    mask_kind: MaskKind = "none"
    has_bias: bool = False
    gqa_group: int = 1
    softcap: float | None = None
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("head_dim", "head_dim_v"):
            size = getattr(self, name)
            if not 1 <= size <= MAX_HEAD_DIM:
                raise ValueError(f"{name}={size} is outside 1..{MAX_HEAD_DIM}")
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind={self.mask_kind!r} is not one of {MASK_KINDS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")
        if not 1 <= self.gqa_group <= MAX_DECODE_ROWS:
            raise ValueError(f"gqa_group={self.gqa_group} is outside 1..{MAX_DECODE_ROWS}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap={self.softcap} must be positive or None")

    @property
    def head_dim_padded(self) -> int:
        """q/k head size rounded up to a power of two (at least 16), the tile width."""
        return max(MIN_TILE, _next_pow2(self.head_dim))

    @property
    def head_dim_v_padded(self) -> int:
        """v head size rounded up to a power of two (at least 16), the tile width."""
        return max(MIN_TILE, _next_pow2(self.head_dim_v))

    @property
    def variant(self) -> str:
        """A readable identifier, distinct for distinct configs, e.g. ``gqa4_d64_f16``."""
        parts = []
        if self.causal:
            parts.append("causal")
        if self.mask_kind != "none":
            parts.append(f"mask{self.mask_kind}")
        if self.has_bias:
            parts.append("bias")
        if self.gqa_group > 1:
            parts.append(f"gqa{self.gqa_group}")
        if self.softcap is not None:
            parts.append("softcap" + repr(float(self.softcap)).replace(".", "p"))
        dims = f"d{self.head_dim}" + (
            "" if self.head_dim_v == self.head_dim else f"v{self.head_dim_v}"
        )
        parts += [dims, {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}[self.dtype]]
        return "_".join(parts)

    @property
    def kernel_name(self) -> str:
        """The split kernel's name, ``_attn_decode_<variant>``."""
        return f"_attn_decode_{self.variant}"

    @property
    def merge_kernel_name(self) -> str:
        """The merge kernel's name, ``_attn_decode_merge_<variant>``."""
        return f"_attn_decode_merge_{self.variant}"

    def to_json(self) -> str:
        """The config as canonical JSON (sorted keys), the form the kernel cache hashes."""
        return json.dumps(asdict(self), sort_keys=True)


def decode_tile(config: DecodeKernelConfig, *, interpret: bool) -> tuple[int, int, int]:
    """Keys per block and launch shape, ``(BLOCK_N, num_warps, num_stages)``.

    Decode is a stream over K and V: blocks of 64 keys with 2-stage pipelining keep loads in
    flight on Ampere/Hopper without spilling the ``rows x head_dim`` fp32 accumulator; wide heads
    and fp32 inputs take 32. The interpreter takes 16 so small test caches span several blocks
    and several splits.

    Args:
        config: the kernel pair.
        interpret: the kernels run in Triton's interpreter.

    Returns:
        ``(BLOCK_N, num_warps, num_stages)``.
    """
    if interpret:
        return (MIN_TILE, 1, 1)
    width = max(config.head_dim_padded, config.head_dim_v_padded)
    block_n = 32 if width > 128 or config.dtype == "float32" else 64
    return (block_n, 4, 2)


def render_decode_kernel(config: DecodeKernelConfig) -> str:
    """Render the Triton module of one decode kernel pair.

    Args:
        config: the kernel pair.

    Returns:
        The module source; it defines ``SPLIT_KERNEL`` and ``MERGE_KERNEL`` (and binds the first
        to ``KERNEL``).
    """
    constants = {
        "HEAD_DIM": config.head_dim,
        "HEAD_DIM_PADDED": config.head_dim_padded,
        "HEAD_DIM_V": config.head_dim_v,
        "HEAD_DIM_V_PADDED": config.head_dim_v_padded,
        "CAUSAL": config.causal,
        "MASK_KIND": config.mask_kind,
        "HAS_BIAS": config.has_bias,
        "GQA_GROUP": config.gqa_group,
        "SOFTCAP": float(config.softcap or 0.0),
        "DOT_PRECISION": "ieee" if config.dtype == "float32" else "tf32",
    }
    constant_lines = "\n".join(
        f"{name} = tl.constexpr({value!r})" for name, value in constants.items()
    )
    return _TEMPLATE.substitute(
        KERNEL_NAME=config.kernel_name,
        MERGE_NAME=config.merge_kernel_name,
        CONFIG_JSON=config.to_json(),
        CONSTANTS=constant_lines,
    )


_TEMPLATE = string.Template(
    '''"""Generated by attnopt.codegen.triton_decode; do not edit.

Kernels: $KERNEL_NAME (split), $MERGE_NAME (merge)
Config: $CONFIG_JSON
"""

import triton
import triton.language as tl

$CONSTANTS
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def $KERNEL_NAME(
    Q, K, V, Mask, Bias, PartOut, PartLse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_pn, stride_ps, stride_pr, stride_pd,
    stride_ln, stride_ls, stride_lr,
    kv_heads, q_len, kv_len, keys_per_split, sm_scale,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    off_bkv = tl.program_id(1)
    off_b = (off_bkv // kv_heads).to(tl.int64)
    off_kvh = (off_bkv % kv_heads).to(tl.int64)
    # Row r of the tile: query head r // q_len of this kv head's group, query position r % q_len.
    offs_r = tl.arange(0, BLOCK_R)
    row_in = offs_r < GQA_GROUP * q_len
    row_pos = offs_r % q_len
    row_head = off_kvh * GQA_GROUP + (offs_r // q_len).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    offs_dv = tl.arange(0, HEAD_DIM_V_PADDED)
    d_in = offs_d < HEAD_DIM
    dv_in = offs_dv < HEAD_DIM_V

    q_ptrs = Q + off_b * stride_qb + row_head[:, None] * stride_qh
    q_ptrs += row_pos[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_in[:, None] & d_in[None, :], other=0.0)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    rows64 = row_pos.to(tl.int64)[:, None]
    mask_rows = Mask + off_b * stride_maskb + row_head[:, None] * stride_maskh + rows64 * stride_maskm
    bias_rows = Bias + off_b * stride_biasb + row_head[:, None] * stride_biash + rows64 * stride_biasm

    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, kv_len)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_V_PADDED], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_in = offs_n < hi
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=key_in[None, :] & d_in[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=key_in[:, None] & dv_in[None, :], other=0.0)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale
        if SOFTCAP > 0:
            # tanh(x) = 1 - 2 / (exp(2x) + 1), saturating cleanly at +-1.
            scores = SOFTCAP * (1.0 - 2.0 / (tl.exp(scores * (2.0 / SOFTCAP)) + 1.0))
        tile_in = row_in[:, None] & key_in[None, :]
        if HAS_BIAS:
            bias_ptrs = bias_rows + offs_n[None, :] * stride_biasn
            scores += tl.load(bias_ptrs, mask=tile_in, other=0.0).to(tl.float32)
        if MASK_KIND == "bool":
            allowed = tl.load(mask_rows + offs_n[None, :] * stride_maskn, mask=tile_in, other=0)
            scores = tl.where(allowed != 0, scores, float("-inf"))
        elif MASK_KIND == "additive":
            mask_ptrs = mask_rows + offs_n[None, :] * stride_maskn
            scores += tl.load(mask_ptrs, mask=tile_in, other=0.0).to(tl.float32)
        visible = tile_in
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= row_pos[:, None] + (kv_len - q_len))
        scores = tl.where(visible, scores * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row with no visible key so far keeps m = -inf; subtract 0 there, not -inf (NaN).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    p_ptrs = PartOut + off_bkv.to(tl.int64) * stride_pn + split * stride_ps
    p_ptrs += offs_r[:, None] * stride_pr + offs_dv[None, :] * stride_pd
    tl.store(p_ptrs, out, mask=row_in[:, None] & dv_in[None, :])
    l_ptrs = PartLse + off_bkv.to(tl.int64) * stride_ln + split * stride_ls + offs_r * stride_lr
    tl.store(l_ptrs, lse, mask=row_in)


@triton.jit
def $MERGE_NAME(
    PartOut, PartLse, Out,
    stride_pn, stride_ps, stride_pr, stride_pd,
    stride_ln, stride_ls, stride_lr,
    stride_ob, stride_oh, stride_om, stride_od,
    kv_heads, q_len, num_splits,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    off_bkv = tl.program_id(1).to(tl.int64)
    off_b = off_bkv // kv_heads
    off_h = (off_bkv % kv_heads) * GQA_GROUP + row // q_len
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, HEAD_DIM_V_PADDED)
    split_in = offs_s < num_splits
    lse = tl.load(
        PartLse + off_bkv * stride_ln + offs_s * stride_ls + row * stride_lr,
        mask=split_in, other=float("-inf"),
    )
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.math.exp2(lse - top)
    total = tl.sum(weights, 0)
    p_ptrs = PartOut + off_bkv * stride_pn + offs_s[:, None] * stride_ps + row * stride_pr
    parts = tl.load(
        p_ptrs + offs_dv[None, :] * stride_pd,
        mask=split_in[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0,
    )
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + (row % q_len) * stride_om
    tl.store(o_ptrs + offs_dv * stride_od, out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)


SPLIT_KERNEL = $KERNEL_NAME
MERGE_KERNEL = $MERGE_NAME
KERNEL = $KERNEL_NAME
'''
)
