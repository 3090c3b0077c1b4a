"""Hypothesis strategies that build small attention modules from composable choices.

Entry points: :func:`attention_programs` (a strategy of :class:`Program`), :class:`Spec` (the
choices of one program, printed by hypothesis when a case fails) and :func:`build` (the module
and example inputs of a spec).

A spec picks, independently where they compose: how q/k/v arrive (given in [B,H,S,D] or
[B,S,H,D], or projected from hidden states and split into heads with view/reshape and
transpose/permute), self or cross attention, the score form (matmul then scale, pre-scaled q,
scale on k, division by sqrt(d), bmm on [B*H,S,D], baddbmm, einsum, or
F.scaled_dot_product_attention with its own arguments), GQA/MQA (repeat_interleave or expand of
the kv heads), soft-capping, additive biases, a mask (bool key padding, additive key padding with
-inf/-1e9/finfo.min, causal built from triu/tril/arange with top-left or bottom-right alignment,
an arbitrary bool mask, given as an input or built inside), the softmax form (softmax,
log_softmax+exp, exp/sum with or without max subtraction, in fp32 then cast back), eval dropout,
and how the heads are merged back. Sizes stay tiny (batch <= 2, heads <= 4, seq <= 17,
head_dim <= 16) so one compile takes a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

SCORE_FORMS = (
    "matmul_mul",  # (q @ k^T) * scale
    "matmul_div",  # (q @ k^T) / sqrt(d)
    "prescale_q",  # (q * scale) @ k^T
    "scale_k",  # q @ (k * scale)^T
    "split_scale",  # (q * sqrt(scale)) @ (k * sqrt(scale))^T
    "permute_k",  # q @ k.permute(0, 1, 3, 2), then scale
    "bmm",  # [B*H, S, D] bmm, then scale
    "baddbmm",  # baddbmm(zeros or bias, q, k^T, alpha=scale)
    "einsum",  # einsum("bhqd,bhkd->bhqk")
    "sdpa",  # F.scaled_dot_product_attention
)
SOFTMAX_FORMS = ("softmax", "functional", "log_softmax_exp", "exp_sum", "exp_sum_shifted")
MASK_KINDS = (
    "none",
    "bool_padding",  # bool [B,1,1,Skv] input, masked_fill / where
    "additive_padding",  # (1 - m) * fill from a 0/1 float input [B, Skv]
    "causal",  # built inside from triu / tril / arange
    "causal_additive",  # full(-inf).triu(1) built inside, added
    "causal_padding",  # causal and bool key padding
    "arbitrary_bool",  # bool [B,1|H,Sq,Skv] input
    "arbitrary_additive",  # float [B,1,Sq,Skv] input of 0 / fill
)
FILLS = ("-inf", "-1e9", "finfo_min", "-1e4")
BIAS_KINDS = ("none", "param", "param_3d", "alibi", "input")
GQA_FORMS = ("repeat_interleave", "expand")
CAUSAL_BUILDS = ("triu", "tril", "arange")
HEAD_MERGES = ("transpose_reshape", "permute_view", "none")


@dataclass(frozen=True)
class Spec:
    """The choices of one generated attention program."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    source: str  # "qkv_bhsd" | "qkv_bshd" | "hidden"
    cross: bool
    score: str
    scale: float | None  # None: 1/sqrt(head_dim)
    softmax: str
    fp32_softmax: bool
    dtype: str  # "float32" | "bfloat16" | "float64"
    mask: str
    fill: str
    mask_where: bool  # torch.where instead of masked_fill
    mask_heads: bool  # arbitrary bool mask per head
    causal_build: str
    causal_bottom_right: bool
    fully_masked_row: bool
    bias: str
    softcap: float | None
    bias_before_softcap: bool  # not the op's order: must be refused, never mis-fused
    gqa_form: str
    dropout: str  # "none" | "module" | "functional"
    merge: str
    sdpa_is_causal: bool
    sdpa_enable_gqa: bool
    sdpa_scale_arg: bool
    return_weights: bool
    magnitude: float
    nonfinite: str  # "none" | "nan_q" | "nan_k" | "inf_k" | "nan_v"
    seed: int = 0
    notes: tuple[str, ...] = field(default=(), compare=False)


def _fill_value(fill: str, dtype: torch.dtype) -> float:
    return {
        "-inf": float("-inf"),
        "-1e9": -1e9,
        "finfo_min": torch.finfo(dtype).min,
        "-1e4": -1e4,
    }[fill]


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    """A strategy of :class:`Spec` with tiny sizes and every choice composable."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.sampled_from((1, 1, 2, 4)))
    group = draw(st.sampled_from((1, 1, 2, 4))) if kv_heads < 4 else 1
    heads = min(4, kv_heads * group)
    if heads % kv_heads:
        heads = kv_heads
    cross = draw(st.booleans())
    q_len = draw(st.integers(1, 17))
    kv_len = draw(st.integers(1, 17)) if cross else q_len
    head_dim = draw(st.sampled_from((1, 2, 3, 4, 5, 8, 16)))
    score = draw(st.sampled_from(SCORE_FORMS))
    mask = draw(st.sampled_from(MASK_KINDS))
    bias = draw(st.sampled_from(BIAS_KINDS))
    softcap = draw(st.sampled_from((None, None, None, 5.0, 30.0)))
    if score == "sdpa":
        softcap = None
    return Spec(
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_dim,
        source=draw(st.sampled_from(("qkv_bhsd", "qkv_bshd", "hidden"))),
        cross=cross,
        score=score,
        scale=draw(st.sampled_from((None, None, 0.125, 1.0, 0.3))),
        softmax=draw(st.sampled_from(SOFTMAX_FORMS)),
        fp32_softmax=draw(st.booleans()),
        dtype=draw(st.sampled_from(("float32",) * 6 + ("bfloat16", "float64"))),
        mask=mask,
        fill=draw(st.sampled_from(FILLS)),
        mask_where=draw(st.booleans()),
        mask_heads=draw(st.booleans()),
        causal_build=draw(st.sampled_from(CAUSAL_BUILDS)),
        causal_bottom_right=draw(st.booleans()),
        fully_masked_row=draw(st.booleans()),
        bias=bias,
        softcap=softcap,
        bias_before_softcap=draw(st.sampled_from((False,) * 4 + (True,))),
        gqa_form=draw(st.sampled_from(GQA_FORMS)),
        dropout=draw(st.sampled_from(("none", "none", "module", "functional"))),
        merge=draw(st.sampled_from(HEAD_MERGES)),
        sdpa_is_causal=draw(st.booleans()),
        sdpa_enable_gqa=draw(st.booleans()),
        sdpa_scale_arg=draw(st.booleans()),
        return_weights=draw(st.sampled_from((False,) * 9 + (True,))),
        magnitude=draw(st.sampled_from((1.0, 1.0, 1.0, 8.0))),
        nonfinite=draw(st.sampled_from(("none",) * 12 + ("nan_q", "nan_k", "inf_k", "nan_v"))),
        seed=draw(st.integers(0, 2**16)),
    )


class FuzzAttention(torch.nn.Module):
    """One attention computation written the way ``spec`` says."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        gen = torch.Generator().manual_seed(spec.seed)
        dtype = getattr(torch, spec.dtype)
        h, hkv, d = spec.heads, spec.kv_heads, spec.head_dim
        self.hidden = h * d
        if spec.source == "hidden":
            self.q_proj = torch.nn.Linear(self.hidden, h * d).to(dtype)
            self.k_proj = torch.nn.Linear(self.hidden, hkv * d).to(dtype)
            self.v_proj = torch.nn.Linear(self.hidden, hkv * d).to(dtype)
            self.o_proj = torch.nn.Linear(h * d, self.hidden).to(dtype)
            for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.3)
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.1)
        if spec.bias in ("param", "param_3d"):
            shape = (h, spec.q_len, spec.kv_len)
            if spec.bias == "param":
                shape = (1, *shape)
            self.bias_param = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        if spec.bias == "alibi":
            slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(h)], dtype=dtype)
            self.register_buffer("slopes", slopes)
        self.dropout = torch.nn.Dropout(0.3)

    # -- pieces ---------------------------------------------------------------------------------
    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """[B, S, n*D] -> [B, n, S, D]."""
        b, s, _ = x.shape
        d = self.spec.head_dim
        if self.spec.merge == "permute_view":
            return x.view(b, s, n, d).permute(0, 2, 1, 3)
        return x.reshape(b, s, n, d).transpose(1, 2)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        group = spec.heads // spec.kv_heads
        if group == 1:
            return x
        if spec.gqa_form == "repeat_interleave":
            return x.repeat_interleave(group, dim=1)
        b, hkv, s, d = x.shape
        return x[:, :, None, :, :].expand(b, hkv, group, s, d).reshape(b, hkv * group, s, d)

    def _scale(self) -> float:
        spec = self.spec
        return spec.scale if spec.scale is not None else 1.0 / math.sqrt(spec.head_dim)

    def _causal_keep(self, device: torch.device) -> torch.Tensor:
        """Bool [Sq, Skv]: True where a query may see a key."""
        spec = self.spec
        sq, skv = spec.q_len, spec.kv_len
        offset = skv - sq if spec.causal_bottom_right else 0
        if spec.causal_build == "triu":
            return ~torch.ones(sq, skv, dtype=torch.bool, device=device).triu(1 + offset)
        if spec.causal_build == "tril":
            return torch.ones(sq, skv, dtype=torch.bool, device=device).tril(offset)
        rows = torch.arange(sq, device=device)[:, None] + offset
        cols = torch.arange(skv, device=device)[None, :]
        return cols <= rows

    def _scores(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None):
        spec = self.spec
        scale = self._scale()
        if spec.score == "matmul_mul":
            return (q @ k.transpose(-2, -1)) * scale
        if spec.score == "matmul_div":
            return torch.matmul(q, k.transpose(-1, -2)) / (1.0 / scale)
        if spec.score == "prescale_q":
            return (q * scale) @ k.transpose(-2, -1)
        if spec.score == "scale_k":
            return q @ (k * scale).transpose(-2, -1)
        if spec.score == "split_scale":
            root = math.sqrt(scale)
            return (q * root) @ (k * root).transpose(-2, -1)
        if spec.score == "permute_k":
            return q.matmul(k.permute(0, 1, 3, 2)) * scale
        if spec.score == "einsum":
            return torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
        b, h, sq, d = q.shape
        skv = k.shape[2]
        q3, k3 = q.reshape(b * h, sq, d), k.reshape(b * h, skv, d)
        if spec.score == "bmm":
            return (torch.bmm(q3, k3.transpose(1, 2)) * scale).view(b, h, sq, skv)
        # baddbmm: the bias (when any) rides in the input
        base = (
            bias.expand(b, h, sq, skv).reshape(b * h, sq, skv)
            if bias is not None
            else torch.zeros(b * h, sq, skv, dtype=q.dtype, device=q.device)
        )
        out = torch.baddbmm(base, q3, k3.transpose(1, 2), beta=1.0, alpha=scale)
        return out.view(b, h, sq, skv)

    def _bias(self, bias_in: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        spec = self.spec
        if spec.bias in ("param", "param_3d"):
            return self.bias_param
        if spec.bias == "alibi":
            pos = torch.arange(spec.kv_len, dtype=dtype)
            dist = pos[None, :] - torch.arange(spec.q_len, dtype=dtype)[:, None]
            return self.slopes[:, None, None] * (-dist.abs())[None]
        if spec.bias == "input":
            return bias_in
        return None

    def _softmax(self, s: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        out_dtype = s.dtype
        if spec.fp32_softmax and s.dtype != torch.float64:  # never a narrowing cast
            s = s.float()
        if spec.softmax == "softmax":
            p = s.softmax(dim=-1)
        elif spec.softmax == "functional":
            p = F.softmax(s, dim=s.dim() - 1)
        elif spec.softmax == "log_softmax_exp":
            p = torch.log_softmax(s, dim=-1).exp()
        elif spec.softmax == "exp_sum":
            e = torch.exp(s)
            p = e / e.sum(dim=-1, keepdim=True)
        else:
            e = torch.exp(s - s.amax(dim=-1, keepdim=True))
            p = e / e.sum(dim=-1, keepdim=True)
        return p.to(out_dtype)

    def _mask_scores(self, s: torch.Tensor, keep: torch.Tensor | None, add: torch.Tensor | None):
        spec = self.spec
        if add is not None:
            s = s + add
        if keep is not None:
            fill = _fill_value(spec.fill, s.dtype)
            if spec.mask_where:
                s = torch.where(keep, s, torch.tensor(fill, dtype=s.dtype))
            else:
                s = s.masked_fill(~keep, fill)
        return s

    def _mask_parts(
        self, mask_in: torch.Tensor | None, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(bool keep mask, additive mask) of the spec."""
        spec = self.spec
        kind = spec.mask
        if kind == "none":
            return None, None
        if kind in ("bool_padding", "arbitrary_bool"):
            return mask_in, None
        if kind == "additive_padding":
            assert mask_in is not None
            fill = _fill_value(spec.fill, dtype)
            if spec.fill == "-inf":
                return None, torch.zeros_like(mask_in).masked_fill(mask_in == 0, fill)[
                    :, None, None, :
                ]
            return None, ((1.0 - mask_in) * fill)[:, None, None, :]
        if kind == "arbitrary_additive":
            return None, mask_in
        keep = self._causal_keep(device)
        if kind == "causal":
            return keep, None
        if kind == "causal_additive":
            add = torch.full((spec.q_len, spec.kv_len), float("-inf"), dtype=dtype, device=device)
            offset = spec.kv_len - spec.q_len if spec.causal_bottom_right else 0
            return None, add.triu(1 + offset)
        assert mask_in is not None  # causal_padding
        return keep[None, None] & mask_in, None

    # -- forward --------------------------------------------------------------------------------
    def forward(self, q, k, v, mask=None, bias=None):
        spec = self.spec
        if spec.source == "hidden":
            x, memory = q, (k if spec.cross else q)
            q = self._heads(self.q_proj(x), spec.heads)
            k = self._heads(self.k_proj(memory), spec.kv_heads)
            v = self._heads(self.v_proj(memory), spec.kv_heads)
        elif spec.source == "qkv_bshd":
            q, k, v = q.transpose(1, 2), k.permute(0, 2, 1, 3), v.transpose(2, 1)
        if spec.score == "sdpa":
            out = self._sdpa(q, k, v, mask, bias)
            weights = None
        else:
            out, weights = self._eager(q, k, v, mask, bias)
        if spec.source == "hidden" or spec.merge != "none":
            b, _, sq, _ = out.shape
            if spec.merge == "permute_view":
                out = out.permute(0, 2, 1, 3).contiguous().view(b, sq, -1)
            else:
                out = out.transpose(1, 2).reshape(b, sq, spec.heads * spec.head_dim)
        if spec.source == "hidden":
            out = self.o_proj(out)
        if spec.return_weights and weights is not None:
            return out, weights
        return out

    def _eager(self, q, k, v, mask, bias_in):
        spec = self.spec
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        bias = self._bias(bias_in, q.dtype)
        s = self._scores(q, k, bias)
        late_bias = spec.softcap is not None and not spec.bias_before_softcap
        if bias is not None and spec.score != "baddbmm" and not late_bias:
            s = s + bias
        if spec.softcap is not None:
            s = torch.tanh(s / spec.softcap) * spec.softcap
        if bias is not None and spec.score != "baddbmm" and late_bias:
            s = s + bias
        keep, add = self._mask_parts(mask, s.dtype, s.device)
        s = self._mask_scores(s, keep, add)
        if spec.score == "bmm":
            b, h, sq, skv = s.shape
            p = self._softmax(s.reshape(b * h, sq, skv))
            p = self._drop(p)
            out = torch.bmm(p, v.reshape(b * h, skv, spec.head_dim))
            return out.view(b, h, sq, spec.head_dim), p
        p = self._drop(self._softmax(s))
        return p @ v, p

    def _drop(self, p: torch.Tensor) -> torch.Tensor:
        if self.spec.dropout == "module":
            return self.dropout(p)
        if self.spec.dropout == "functional":
            return F.dropout(p, p=0.1, training=self.training)
        return p

    def _sdpa(self, q, k, v, mask, bias_in):
        spec = self.spec
        gqa = spec.sdpa_enable_gqa and spec.heads != spec.kv_heads
        if not gqa:
            k, v = self._repeat_kv(k), self._repeat_kv(v)
        keep, add = self._mask_parts(mask, q.dtype, q.device)
        bias = self._bias(bias_in, q.dtype)
        attn_mask = keep
        is_causal = False
        top_left = not spec.causal_bottom_right
        if spec.mask == "causal" and spec.sdpa_is_causal and top_left and bias is None:
            attn_mask, is_causal = None, True  # sdpa's is_causal is top-left aligned
        if add is not None:
            attn_mask = add if attn_mask is None else add.masked_fill(~attn_mask, float("-inf"))
        if bias is not None:
            if attn_mask is None:
                attn_mask = bias
            elif attn_mask.dtype == torch.bool:
                attn_mask = bias.masked_fill(~attn_mask, float("-inf"))
            else:
                attn_mask = attn_mask + bias
        kwargs = {}
        if spec.sdpa_scale_arg or spec.scale is not None:
            kwargs["scale"] = self._scale()
        if gqa:
            kwargs["enable_gqa"] = True
        dropout_p = 0.1 if spec.dropout != "none" and self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs
        )


@dataclass
class Program:
    """A generated module with its example inputs."""

    spec: Spec
    model: torch.nn.Module
    args: tuple
    kwargs: dict

    def __repr__(self) -> str:
        return f"Program({self.spec!r})"


def _inputs(spec: Spec) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(spec.seed + 1)
    dtype = getattr(torch, spec.dtype)
    b, h, hkv, d = spec.batch, spec.heads, spec.kv_heads, spec.head_dim
    sq, skv = spec.q_len, spec.kv_len

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * spec.magnitude).to(dtype)

    if spec.source == "hidden":
        q = randn(b, sq, h * d)
        k = randn(b, skv, h * d) if spec.cross else q.clone()
        v = k.clone()
    elif spec.source == "qkv_bshd":
        q, k, v = randn(b, sq, h, d), randn(b, skv, hkv, d), randn(b, skv, hkv, d)
    else:
        q, k, v = randn(b, h, sq, d), randn(b, hkv, skv, d), randn(b, hkv, skv, d)
    _poison(spec, q, k, v)
    kwargs: dict = {}
    if spec.mask in ("bool_padding", "causal_padding", "additive_padding"):
        keep = torch.rand((b, skv), generator=gen) > 0.3
        keep[:, 0] = True
        if spec.fully_masked_row:
            keep[-1] = False
        if spec.mask == "additive_padding":
            kwargs["mask"] = keep.to(dtype)
        else:
            kwargs["mask"] = keep[:, None, None, :]
    elif spec.mask in ("arbitrary_bool", "arbitrary_additive"):
        heads = h if spec.mask_heads and spec.mask == "arbitrary_bool" else 1
        keep = torch.rand((b, heads, sq, skv), generator=gen) > 0.4
        keep[..., 0] = True
        if spec.fully_masked_row:
            keep[-1, :, -1, :] = False
        if spec.mask == "arbitrary_bool":
            kwargs["mask"] = keep
        else:
            fill = _fill_value(spec.fill, dtype)
            kwargs["mask"] = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, fill)
    if spec.bias == "input":
        kwargs["bias"] = randn(1, h, sq, skv)
    return (q, k, v), kwargs


def _poison(spec: Spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if spec.nonfinite == "none":
        return
    target = {"nan_q": q, "nan_k": k, "inf_k": k, "nan_v": v}[spec.nonfinite]
    value = float("inf") if spec.nonfinite == "inf_k" else float("nan")
    target.view(-1)[-1] = value


def build(spec: Spec) -> Program:
    """The module (in eval mode) and example inputs of ``spec``.

    Args:
        spec: the choices.

    Returns:
        The :class:`Program`.
    """
    model = FuzzAttention(spec).eval()
    args, kwargs = _inputs(spec)
    return Program(spec, model, args, kwargs)


def attention_programs() -> st.SearchStrategy[Program]:
    """A strategy of :class:`Program` (tiny attention modules and their inputs)."""
    return specs().map(build)
