"""Fused flash-attention forward kernels in Triton, rendered from one template.

Entry points: :class:`AttentionKernelConfig`, :func:`render_attention_kernel`, :class:`KernelSource`,
:func:`autotune_configs`, :func:`interpreter_tile`.

Every variant of the `attention` op (docs/attention-op.md) is the same template specialised on
module-level ``tl.constexpr`` constants: causal, mask kind, bias, GQA group, softcap, sparsity
(dense, sliding window with sinks, block-sparse with optional full-block lists) and head sizes.
The algorithm is the online softmax of FlashAttention: one program per (query block, batch*head)
walks the key blocks it may see, keeps a running row max and row sum in fp32, and rescales its
fp32 accumulator. Key blocks outside the visible range are never loaded; only blocks that straddle
a boundary (sequence end, causal diagonal, window edge, partial sparse blocks) pay for a
per-element mask. The rendered module is plain Python that can be dumped, cached and imported.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from typing import Literal

MaskKind = Literal["none", "bool", "additive"]
Sparsity = Literal["dense", "block_sparse", "sliding_window"]

MASK_KINDS: tuple[str, ...] = ("none", "bool", "additive")
SPARSITIES: tuple[str, ...] = ("dense", "block_sparse", "sliding_window")
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
#: Largest head size the template serves (the q tile and the accumulator live in registers).
MAX_HEAD_DIM = 256
#: tl.dot needs every tile side to be at least 16.
MIN_TILE = 16


def _next_pow2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class AttentionKernelConfig:
    """The static description of one attention kernel variant.

    Attributes:
        head_dim: size of q and k's last dim (any size up to 256; padded to a power of two).
        head_dim_v: size of v's last dim.
        causal: bottom-right aligned causal rule.
        mask_kind: ``"none"``, ``"bool"`` (True = may attend) or ``"additive"``.
        has_bias: an additive bias tensor is passed.
        gqa_group: query heads per key/value head (1 = MHA, ``Hq`` = MQA).
        softcap: tanh soft-capping of the scaled scores, or None.
        sparsity: ``"dense"``, ``"block_sparse"`` or ``"sliding_window"``.
        window_left: keys visible before the aligned position (None = unlimited).
        window_right: keys visible after the aligned position (None = unlimited).
        sinks: leading keys visible to every query (sliding window only).
        block_q: query rows per sparse metadata block (block-sparse only, a power of two >= 16).
        block_k: keys per sparse metadata block (block-sparse only, a power of two >= 16).
        has_full_blocks: block-sparse metadata also lists "full" key blocks, which skip the
            causal and sequence-end checks (mask and bias tensors still apply).
        dtype: dtype name of q, k and v (``"float16"``, ``"bfloat16"``, ``"float32"``).
    """

    head_dim: int
    head_dim_v: int
    causal: bool = False
    mask_kind: MaskKind = "none"
    has_bias: bool = False
    gqa_group: int = 1
    softcap: float | None = None
    sparsity: Sparsity = "dense"
    window_left: int | None = None
    window_right: int | None = None
    sinks: int = 0
    block_q: int | None = None
    block_k: int | None = None
    has_full_blocks: bool = False
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("head_dim", "head_dim_v"):
            size = getattr(self, name)
            if not 1 <= size <= MAX_HEAD_DIM:
                raise ValueError(f"{name}={size} is outside 1..{MAX_HEAD_DIM}")
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind={self.mask_kind!r} is not one of {MASK_KINDS}")
        if self.sparsity not in SPARSITIES:
            raise ValueError(f"sparsity={self.sparsity!r} is not one of {SPARSITIES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")
        if self.gqa_group < 1:
            raise ValueError(f"gqa_group={self.gqa_group} must be >= 1")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap={self.softcap} must be positive or None")
        self._check_sparsity()

    def _check_sparsity(self) -> None:
        windowed = (self.window_left, self.window_right, self.sinks) != (None, None, 0)
        if self.sparsity != "sliding_window" and windowed:
            raise ValueError("window_left/window_right/sinks need sparsity='sliding_window'")
        for name in ("window_left", "window_right", "sinks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        blocked = (self.block_q, self.block_k, self.has_full_blocks) != (None, None, False)
        if self.sparsity != "block_sparse":
            if blocked:
                raise ValueError("block_q/block_k/has_full_blocks need sparsity='block_sparse'")
            return
        for name in ("block_q", "block_k"):
            size = getattr(self, name)
            if size is None or size < MIN_TILE or not _is_pow2(size):
                raise ValueError(f"{name}={size} must be a power of two >= {MIN_TILE}")

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
        """A readable identifier that is distinct for distinct configs, e.g. ``causal_d64_f16``."""
        parts = [self.sparsity]
        if self.causal:
            parts.append("causal")
        if self.mask_kind != "none":
            parts.append(f"mask{self.mask_kind}")
        if self.has_bias:
            parts.append("bias")
        if self.gqa_group > 1:
            parts.append(f"gqa{self.gqa_group}")
        if self.softcap is not None:
            parts.append("softcap" + _number_tag(self.softcap))
        if self.sparsity == "sliding_window":
            left = "inf" if self.window_left is None else str(self.window_left)
            right = "inf" if self.window_right is None else str(self.window_right)
            parts.append(f"wl{left}_wr{right}_sinks{self.sinks}")
        if self.sparsity == "block_sparse":
            parts.append(
                f"bq{self.block_q}_bk{self.block_k}" + ("_full" if self.has_full_blocks else "")
            )
        dims = f"d{self.head_dim}" + (
            "" if self.head_dim_v == self.head_dim else f"v{self.head_dim_v}"
        )
        parts += [dims, {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}[self.dtype]]
        return "_".join(parts)

    @property
    def kernel_name(self) -> str:
        """The Triton kernel's function name, ``_attn_fwd_<variant>``."""
        return f"_attn_fwd_{self.variant}"

    def to_json(self) -> str:
        """The config as canonical JSON (sorted keys), the form the kernel cache hashes.

        Returns:
            A JSON object text.
        """
        return json.dumps(asdict(self), sort_keys=True)


def _number_tag(value: float) -> str:
    return repr(float(value)).replace(".", "p").replace("-", "m").replace("+", "")


@dataclass(frozen=True)
class KernelSource:
    """A rendered kernel module.

    Attributes:
        name: the kernel function's name (``_attn_fwd_<variant>``); the module also binds it to
            ``KERNEL`` and defines ``AUTOTUNE_CONFIGS`` and ``INTERPRETER_CONFIGS``.
        source: the complete Python/Triton module text.
        config: the config it was rendered from.
    """

    name: str
    source: str
    config: AttentionKernelConfig


def autotune_configs(config: AttentionKernelConfig) -> list[tuple[int, int, int, int]]:
    """Tile choices for GPUs, as ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``.

    Aimed at Hopper and Ampere: wide tiles with 3-stage pipelining for small heads, narrower
    tiles as the head size (registers, shared memory) grows; fp32 inputs use IEEE dots and get
    smaller tiles. Block-sparse tiles must divide the metadata block sizes.

    Args:
        config: the kernel variant.

    Returns:
        A non-empty list of tile choices.
    """
    width = max(config.head_dim_padded, config.head_dim_v_padded)
    if config.dtype == "float32":
        choices = [(64, 32, 4, 2), (64, 64, 4, 2), (32, 32, 4, 2), (128, 32, 8, 2)]
    elif width <= 64:
        choices = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)]
    elif width <= 128:
        choices = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)]
    else:
        choices = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (32, 32, 4, 2)]
    if config.sparsity == "block_sparse":
        assert config.block_q is not None and config.block_k is not None
        choices = [c for c in choices if c[0] <= config.block_q and c[1] <= config.block_k]
        if not choices:
            choices = [(min(config.block_q, 64), min(config.block_k, 64), 4, 2)]
    return choices


def interpreter_tile(config: AttentionKernelConfig) -> tuple[int, int, int, int]:
    """The single tile used under the Triton interpreter (CPU tests).

    32x32 keeps the interpreter's per-block overhead low while sequences of a few dozen tokens
    still span several blocks (edges, partial blocks, skipped blocks are all exercised).

    Args:
        config: the kernel variant.

    Returns:
        ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``.
    """
    return (min(32, config.block_q or 32), min(32, config.block_k or 32), 1, 1)


def render_attention_kernel(config: AttentionKernelConfig) -> KernelSource:
    """Render the Triton module for one variant from the single template.

    Args:
        config: the kernel variant.

    Returns:
        The :class:`KernelSource`; its ``source`` imports ``triton`` and defines the kernel.
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
        "SPARSITY": config.sparsity,
        "WINDOW_LEFT": -1 if config.window_left is None else config.window_left,
        "WINDOW_RIGHT": -1 if config.window_right is None else config.window_right,
        "SINKS": config.sinks,
        "SPARSE_BLOCK_Q": config.block_q or MIN_TILE,
        "SPARSE_BLOCK_K": config.block_k or MIN_TILE,
        "HAS_FULL_BLOCKS": config.has_full_blocks,
        # fp32 inputs use IEEE fp32 dots to meet the fp32 tolerance; 16-bit inputs ignore this.
        "DOT_PRECISION": "ieee" if config.dtype == "float32" else "tf32",
    }
    constant_lines = "\n".join(
        f"{name} = tl.constexpr({value!r})" for name, value in constants.items()
    )
    source = _TEMPLATE.substitute(
        KERNEL_NAME=config.kernel_name,
        CONFIG_JSON=config.to_json(),
        CONSTANTS=constant_lines,
        AUTOTUNE_CONFIGS=_render_tiles(autotune_configs(config)),
        INTERPRETER_CONFIGS=_render_tiles([interpreter_tile(config)]),
    )
    return KernelSource(name=config.kernel_name, source=source, config=config)


def _render_tiles(tiles: list[tuple[int, int, int, int]]) -> str:
    lines = [
        f'    triton.Config({{"BLOCK_M": {m}, "BLOCK_N": {n}}}, num_warps={w}, num_stages={s}),'
        for m, n, w, s in tiles
    ]
    return "[\n" + "\n".join(lines) + "\n]"


_TEMPLATE = string.Template(
    '''"""Generated by attnopt.codegen.triton_attention; do not edit.

Kernel: $KERNEL_NAME
Config: $CONFIG_JSON
"""

import triton
import triton.language as tl

$CONSTANTS
LOG2E = tl.constexpr(1.4426950408889634)

AUTOTUNE_CONFIGS = $AUTOTUNE_CONFIGS
INTERPRETER_CONFIGS = $INTERPRETER_CONFIGS


@triton.jit
def _visible_keys(offs_m, offs_n, q_len, kv_len):
    # Sequence end, causal diagonal and sliding window (with sinks) for one score tile.
    pos = offs_m[:, None] + (kv_len - q_len)
    keys = offs_n[None, :]
    visible = keys < kv_len
    if CAUSAL:
        visible = visible & (keys <= pos)
    if SPARSITY == "sliding_window":
        in_window = keys >= 0
        if WINDOW_LEFT >= 0:
            in_window = in_window & (keys >= pos - WINDOW_LEFT)
        if WINDOW_RIGHT >= 0:
            in_window = in_window & (keys <= pos + WINDOW_RIGHT)
        if SINKS > 0:
            in_window = in_window | (keys < SINKS)
        visible = visible & in_window
    return visible


@triton.jit
def _attn_fwd_range(
    acc, l_i, m_i, q, lo, hi, offs_m, offs_d, offs_dv,
    k_base, v_base, mask_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
    stride_maskm, stride_maskn, stride_biasm, stride_biasn,
    q_len, kv_len, sm_scale,
    BLOCK_N: tl.constexpr, CHECK_ELEMENTS: tl.constexpr,
):
    # Online softmax over key blocks [lo, hi); lo is a multiple of BLOCK_N. Without
    # CHECK_ELEMENTS the caller guarantees every key is in range and causally/window visible.
    d_in = offs_d < HEAD_DIM
    dv_in = offs_dv < HEAD_DIM_V
    row_in = offs_m < q_len
    # A dense [Sq, Sk] mask or bias can pass 2**31 elements: 64-bit row offsets.
    rows64 = offs_m.to(tl.int64)[:, None]
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_in = offs_n < kv_len
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        if CHECK_ELEMENTS:
            k = tl.load(k_ptrs, mask=key_in[None, :] & d_in[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=key_in[:, None] & dv_in[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PADDED and HEAD_DIM_V == HEAD_DIM_V_PADDED:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_in[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=dv_in[None, :], other=0.0)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale
        if SOFTCAP > 0:
            # tanh(x) = 1 - 2 / (exp(2x) + 1), saturating cleanly at +-1.
            scores = SOFTCAP * (1.0 - 2.0 / (tl.exp(scores * (2.0 / SOFTCAP)) + 1.0))
        tile_in = row_in[:, None] & key_in[None, :]
        if HAS_BIAS:
            bias_ptrs = bias_base + rows64 * stride_biasm + offs_n[None, :] * stride_biasn
            scores += tl.load(bias_ptrs, mask=tile_in, other=0.0).to(tl.float32)
        if MASK_KIND != "none":
            mask_ptrs = mask_base + rows64 * stride_maskm + offs_n[None, :] * stride_maskn
            if MASK_KIND == "bool":
                allowed = tl.load(mask_ptrs, mask=tile_in, other=0)
                scores = tl.where(allowed != 0, scores, float("-inf"))
            else:
                scores += tl.load(mask_ptrs, mask=tile_in, other=0.0).to(tl.float32)
        if CHECK_ELEMENTS:
            visible = _visible_keys(offs_m, offs_n, q_len, kv_len)
            scores = tl.where(visible, scores, float("-inf"))
        scores = scores * LOG2E
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row with no visible key so far keeps m = -inf; subtract 0 there, not -inf (NaN).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def $KERNEL_NAME(
    Q, K, V, Out, Mask, Bias, KvCounts, KvIndices, FullKvCounts, FullKvIndices,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_cntb, stride_cnth, stride_cntm,
    stride_idxb, stride_idxh, stride_idxm, stride_idxk,
    stride_fcntb, stride_fcnth, stride_fcntm,
    stride_fidxb, stride_fidxh, stride_fidxm, stride_fidxk,
    num_heads, q_len, kv_len, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    off_kvh = off_h // GQA_GROUP
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    offs_dv = tl.arange(0, HEAD_DIM_V_PADDED)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh
    q_ptrs += offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    mask_base = Mask + off_b * stride_maskb + off_h * stride_maskh
    bias_base = Bias + off_b * stride_biasb + off_h * stride_biash

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V_PADDED], dtype=tl.float32)

    if SPARSITY == "block_sparse":
        meta_m = m0 // SPARSE_BLOCK_Q
        num_blocks = tl.load(KvCounts + off_b * stride_cntb + off_h * stride_cnth + meta_m * stride_cntm)
        index_ptr = KvIndices + off_b * stride_idxb + off_h * stride_idxh + meta_m * stride_idxm
        for i in range(0, num_blocks):
            lo = tl.load(index_ptr + i * stride_idxk) * SPARSE_BLOCK_K
            acc, l_i, m_i = _attn_fwd_range(
                acc, l_i, m_i, q, lo, lo + SPARSE_BLOCK_K, offs_m, offs_d, offs_dv,
                k_base, v_base, mask_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_maskm, stride_maskn, stride_biasm, stride_biasn,
                q_len, kv_len, sm_scale, BLOCK_N, True,
            )
        if HAS_FULL_BLOCKS:
            num_full = tl.load(FullKvCounts + off_b * stride_fcntb + off_h * stride_fcnth + meta_m * stride_fcntm)
            full_ptr = FullKvIndices + off_b * stride_fidxb + off_h * stride_fidxh + meta_m * stride_fidxm
            for i in range(0, num_full):
                lo = tl.load(full_ptr + i * stride_fidxk) * SPARSE_BLOCK_K
                acc, l_i, m_i = _attn_fwd_range(
                    acc, l_i, m_i, q, lo, lo + SPARSE_BLOCK_K, offs_m, offs_d, offs_dv,
                    k_base, v_base, mask_base, bias_base,
                    stride_kn, stride_kd, stride_vn, stride_vd,
                    stride_maskm, stride_maskn, stride_biasm, stride_biasn,
                    q_len, kv_len, sm_scale, BLOCK_N, False,
                )
    else:
        # Visit [lo, hi); inside [full_lo, full_hi) every key is visible to every row of the
        # block, so only the edges pay for the per-element check. Nothing outside is loaded.
        offset = kv_len - q_len
        lo = 0
        hi = kv_len
        full_lo = 0
        full_hi = (kv_len // BLOCK_N) * BLOCK_N
        if CAUSAL:
            hi = tl.minimum(hi, tl.maximum(m0 + BLOCK_M + offset, 0))
            full_hi = tl.minimum(full_hi, (tl.maximum(m0 + offset + 1, 0) // BLOCK_N) * BLOCK_N)
        if WINDOW_RIGHT >= 0:
            hi = tl.minimum(hi, tl.maximum(m0 + BLOCK_M + offset + WINDOW_RIGHT, 0))
            last_full = tl.maximum(m0 + offset + WINDOW_RIGHT + 1, 0)
            full_hi = tl.minimum(full_hi, (last_full // BLOCK_N) * BLOCK_N)
        if WINDOW_LEFT >= 0:
            lo = (tl.maximum(m0 + offset - WINDOW_LEFT, 0) // BLOCK_N) * BLOCK_N
            first_full = tl.maximum(m0 + BLOCK_M - 1 + offset - WINDOW_LEFT, 0)
            full_lo = tl.cdiv(first_full, BLOCK_N) * BLOCK_N
        hi = tl.maximum(hi, lo)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.cdiv(hi, BLOCK_N) * BLOCK_N)
        full_hi = tl.maximum(full_hi, full_lo)
        if SINKS > 0 and WINDOW_LEFT >= 0:
            sinks_hi = tl.minimum(tl.cdiv(SINKS, BLOCK_N) * BLOCK_N, lo)
            acc, l_i, m_i = _attn_fwd_range(
                acc, l_i, m_i, q, 0, sinks_hi, offs_m, offs_d, offs_dv,
                k_base, v_base, mask_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_maskm, stride_maskn, stride_biasm, stride_biasn,
                q_len, kv_len, sm_scale, BLOCK_N, True,
            )
        acc, l_i, m_i = _attn_fwd_range(
            acc, l_i, m_i, q, lo, full_lo, offs_m, offs_d, offs_dv,
            k_base, v_base, mask_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_maskm, stride_maskn, stride_biasm, stride_biasn,
            q_len, kv_len, sm_scale, BLOCK_N, True,
        )
        acc, l_i, m_i = _attn_fwd_range(
            acc, l_i, m_i, q, full_lo, full_hi, offs_m, offs_d, offs_dv,
            k_base, v_base, mask_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_maskm, stride_maskn, stride_biasm, stride_biasn,
            q_len, kv_len, sm_scale, BLOCK_N, False,
        )
        acc, l_i, m_i = _attn_fwd_range(
            acc, l_i, m_i, q, full_hi, hi, offs_m, offs_d, offs_dv,
            k_base, v_base, mask_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_maskm, stride_maskn, stride_biasm, stride_biasn,
            q_len, kv_len, sm_scale, BLOCK_N, True,
        )

    # Rows that saw no key have l = 0 and acc = 0: they store zeros, as the op requires.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh
    o_ptrs += offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    o_mask = (offs_m < q_len)[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)


KERNEL = $KERNEL_NAME
'''
)
