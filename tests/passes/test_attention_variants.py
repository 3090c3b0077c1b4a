"""Attention written in many forms: each must fuse to exactly one site (or be refused) and match
eager. Every case asserts the number of fused sites and the numerics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.tolerances import assert_close

B, H, S, D = 2, 4, 9, 8
KV = 13  # key length for cross attention


def _qkv(batch=B, heads=H, q_len=S, kv_len=S, dim=D, kv_heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    return q, k, v


def _padding(batch=B, kv_len=S):
    keep = torch.ones(batch, kv_len, dtype=torch.bool)
    keep[0, -3:] = False
    return keep


class Fn(nn.Module):
    """Wraps a function as a module (buffers passed at construction)."""

    def __init__(self, fn, **buffers):
        super().__init__()
        self.fn = fn
        for name, value in buffers.items():
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value)

    def forward(self, *args):
        return self.fn(self, *args)


SCALE = D**-0.5
TRIL = torch.tril(torch.ones(S, S, dtype=torch.bool))


def _causal_lower_right(q_len, kv_len):
    return torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=kv_len - q_len)


# Each case: name -> (module, inputs, expected fused sites, expected causal or None)
def _cases():
    q, k, v = _qkv()
    qc, kc, vc = _qkv(kv_len=KV)
    qg, kg, vg = _qkv(kv_heads=2)
    keep = _padding()
    additive = torch.zeros(B, 1, 1, S).masked_fill(
        ~keep[:, None, None, :], torch.finfo(torch.float32).min
    )
    cases = {
        "matmul-div-sqrt": (
            Fn(lambda m, q, k, v: torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), -1) @ v),
            (q, k, v),
            1,
            False,
        ),
        "matmul-mul-scale": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(torch.matmul(q, k.transpose(2, 3)) * SCALE, dim=-1) @ v
                )
            ),
            (q, k, v),
            1,
            False,
        ),
        "prescaled-q": (
            Fn(lambda m, q, k, v: ((q * SCALE) @ k.transpose(-1, -2)).softmax(-1) @ v),
            (q, k, v),
            1,
            False,
        ),
        "prescaled-q-and-k": (
            Fn(
                lambda m, q, k, v: (
                    ((q * D**-0.25) @ (k * D**-0.25).transpose(-1, -2)).softmax(-1) @ v
                )
            ),
            (q, k, v),
            1,
            False,
        ),
        "bmm-3d-heads-flattened": (
            Fn(
                lambda m, q, k, v: torch.bmm(
                    torch.softmax(
                        torch.bmm(q.reshape(B * H, S, D), k.reshape(B * H, S, D).transpose(1, 2))
                        * SCALE,
                        -1,
                    ),
                    v.reshape(B * H, S, D),
                ).reshape(B, H, S, D)
            ),
            (q, k, v),
            1,
            False,
        ),
        "baddbmm-alpha": (
            Fn(
                lambda m, q, k, v: torch.bmm(
                    torch.softmax(
                        torch.baddbmm(
                            torch.zeros(B * H, S, S),
                            q.reshape(B * H, S, D),
                            k.reshape(B * H, S, D).transpose(1, 2),
                            beta=0.0,
                            alpha=SCALE,
                        ),
                        -1,
                    ),
                    v.reshape(B * H, S, D),
                )
            ),
            (q, k, v),
            1,
            False,
        ),
        "einsum-bhqd": (
            Fn(
                lambda m, q, k, v: torch.einsum(
                    "bhqk,bhkd->bhqd",
                    torch.einsum("bhqd,bhkd->bhqk", q, k).mul(SCALE).softmax(-1),
                    v,
                )
            ),
            (q, k, v),
            1,
            False,
        ),
        "einsum-bqhd-layout": (
            Fn(
                lambda m, q, k, v: torch.einsum(
                    "bhqk,bkhd->bqhd",
                    torch.einsum("bqhd,bkhd->bhqk", q.transpose(1, 2), k.transpose(1, 2))
                    .mul(SCALE)
                    .softmax(-1),
                    v.transpose(1, 2),
                )
            ),
            (q, k, v),
            1,
            False,
        ),
        "gpt2-old-permute-k": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(q @ k.transpose(1, 2).permute(0, 2, 3, 1) * SCALE, -1) @ v
                )
            ),
            (q, k, v),
            1,
            False,
        ),
        "log-softmax-exp": (
            Fn(lambda m, q, k, v: torch.log_softmax(q @ k.transpose(-1, -2) * SCALE, -1).exp() @ v),
            (q, k, v),
            1,
            False,
        ),
        "exp-sum-with-max": (
            Fn(lambda m, q, k, v: _manual_softmax(q @ k.transpose(-1, -2) * SCALE, True) @ v),
            (q, k, v),
            1,
            False,
        ),
        "exp-sum-without-max": (
            Fn(lambda m, q, k, v: _manual_softmax(q @ k.transpose(-1, -2) * SCALE, False) @ v),
            (q, k, v),
            1,
            False,
        ),
        "softmax-in-float64-cast-back": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax((q @ k.transpose(-1, -2) * SCALE).double(), -1).float() @ v
                )
            ),
            (q, k, v),
            1,
            False,
        ),
        "softmax-dtype-kwarg": (
            Fn(
                lambda m, q, k, v: (
                    F.softmax(q @ k.transpose(-1, -2) * SCALE, dim=-1, dtype=torch.float32) @ v
                )
            ),
            (q, k, v),
            1,
            False,
        ),
        "additive-padding-mask-finfo-min": (
            Fn(
                lambda m, q, k, v, mask: (
                    torch.softmax(q @ k.transpose(-1, -2) * SCALE + mask, -1) @ v
                )
            ),
            (q, k, v, additive),
            1,
            False,
        ),
        "masked-fill-bool-neg-inf": (
            Fn(
                lambda m, q, k, v, keep: (
                    torch.softmax(
                        (q @ k.transpose(-1, -2) * SCALE).masked_fill(
                            ~keep[:, None, None, :], float("-inf")
                        ),
                        -1,
                    )
                    @ v
                )
            ),
            (q, k, v, keep),
            1,
            False,
        ),
        "masked-fill-finfo-min": (
            Fn(
                lambda m, q, k, v, keep: (
                    torch.softmax(
                        (q @ k.transpose(-1, -2) * SCALE).masked_fill(
                            ~keep[:, None, None, :], torch.finfo(torch.float32).min
                        ),
                        -1,
                    )
                    @ v
                )
            ),
            (q, k, v, keep),
            1,
            False,
        ),
        "where-mask-scores-fill": (
            Fn(
                lambda m, q, k, v, keep: (
                    torch.softmax(
                        torch.where(
                            keep[:, None, None, :], q @ k.transpose(-1, -2) * SCALE, m.fill
                        ),
                        -1,
                    )
                    @ v
                ),
                fill=torch.tensor(torch.finfo(torch.float32).min),
            ),
            (q, k, v, keep),
            1,
            False,
        ),
        "causal-tril-buffer-masked-fill": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(
                        (q @ k.transpose(-1, -2) * SCALE).masked_fill(~m.tril, float("-inf")), -1
                    )
                    @ v
                ),
                tril=TRIL,
            ),
            (q, k, v),
            1,
            True,
        ),
        "causal-triu-built-in-forward": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(
                        (q @ k.transpose(-1, -2) * SCALE).masked_fill(
                            torch.triu(torch.ones(S, S, dtype=torch.bool), 1), float("-inf")
                        ),
                        -1,
                    )
                    @ v
                )
            ),
            (q, k, v),
            1,
            True,
        ),
        "causal-additive-neg-inf": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(
                        q @ k.transpose(-1, -2) * SCALE + torch.full((S, S), float("-inf")).triu(1),
                        -1,
                    )
                    @ v
                )
            ),
            (q, k, v),
            1,
            True,
        ),
        "causal-gpt2-where-bias": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(
                        torch.where(
                            m.bias[:, :, :S, :S],
                            q @ k.transpose(-1, -2) / math.sqrt(D),
                            torch.full([], torch.finfo(torch.float32).min),
                        ),
                        -1,
                    )
                    @ v
                ),
                bias=torch.tril(torch.ones(16, 16, dtype=torch.bool)).view(1, 1, 16, 16),
            ),
            (q, k, v),
            1,
            True,
        ),
        "causal-lower-right-cross": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(
                        (q @ k.transpose(-1, -2) * SCALE).masked_fill(
                            ~_causal_lower_right(S, KV), float("-inf")
                        ),
                        -1,
                    )
                    @ v
                )
            ),
            (qc, kc, vc),
            1,
            True,
        ),
        "cross-attention-kv-longer": (
            Fn(lambda m, q, k, v: torch.softmax(q @ k.transpose(-1, -2) * SCALE, -1) @ v),
            (qc, kc, vc),
            1,
            False,
        ),
        "gqa-repeat-interleave": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * SCALE, -1)
                    @ v.repeat_interleave(2, dim=1)
                )
            ),
            (qg, kg, vg),
            1,
            False,
        ),
        "gqa-expand-reshape": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(q @ _repeat_kv(k, 2).transpose(-1, -2) * SCALE, -1)
                    @ _repeat_kv(v, 2)
                )
            ),
            (qg, kg, vg),
            1,
            False,
        ),
        "mqa-broadcast-k": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(q @ k[:, :1].transpose(-1, -2) * SCALE, -1) @ v[:, :1]
                )
            ),
            (q, k, v),
            1,
            False,
        ),
        "dropout-eval": (
            _DropoutAttention(),
            (q, k, v),
            1,
            False,
        ),
        "sdpa-is-causal": (
            Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            (q, k, v),
            1,
            True,
        ),
        "sdpa-bool-mask": (
            Fn(
                lambda m, q, k, v, keep: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=keep[:, None, None, :]
                )
            ),
            (q, k, v, keep),
            1,
            False,
        ),
        "sdpa-enable-gqa-scale": (
            Fn(
                lambda m, q, k, v: F.scaled_dot_product_attention(
                    q, k, v, scale=0.3, enable_gqa=True
                )
            ),
            (qg, kg, vg),
            1,
            False,
        ),
        "sdpa-is-causal-top-left-cross": (
            Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            (qc, kc, vc),
            1,
            False,
        ),
        "t5-relative-bias-no-scale": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax((q @ k.transpose(3, 2) + m.rel).float(), -1).type_as(q) @ v
                ),
                rel=nn.Parameter(torch.randn(1, H, S, S)),
            ),
            (q, k, v),
            1,
            False,
        ),
        "alibi-bias": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(
                        q @ k.transpose(-1, -2) * SCALE
                        + m.slopes[None, :, None, None]
                        * (torch.arange(S)[None, :] - torch.arange(S)[:, None]).float(),
                        -1,
                    )
                    @ v
                ),
                slopes=torch.tensor([2.0 ** -(i + 1) for i in range(H)]),
            ),
            (q, k, v),
            1,
            False,
        ),
        "tanh-softcap": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(torch.tanh(q @ k.transpose(-1, -2) * SCALE / 5.0) * 5.0, -1) @ v
                )
            ),
            (q, k, v),
            1,
            False,
        ),
        "softcap-with-constant-sliding-window": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(
                        (torch.tanh(q @ k.transpose(-1, -2) * SCALE / 5.0) * 5.0).masked_fill(
                            ~m.window, float("-inf")
                        ),
                        -1,
                    )
                    @ v
                ),
                window=TRIL & ~torch.ones(S, S, dtype=torch.bool).tril(-3),
            ),
            (q, k, v),
            1,
            True,
        ),
        "per-head-learned-logit-scale-cosine": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(
                        F.normalize(q, dim=-1)
                        @ F.normalize(k, dim=-1).transpose(-1, -2)
                        * torch.clamp(m.logit_scale, max=math.log(100.0)).exp(),
                        -1,
                    )
                    @ v
                ),
                logit_scale=nn.Parameter(torch.log(10 * torch.ones(H, 1, 1))),
            ),
            (q, k, v),
            1,
            False,
        ),
        "scale-from-tensor-constant": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(q @ k.transpose(-1, -2) / torch.tensor(float(D)).sqrt(), -1) @ v
                )
            ),
            (q, k, v),
            1,
            False,
        ),
        "swin-mask-in-5d-view": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(
                        (
                            ((q * SCALE) @ k.transpose(-2, -1)).view(1, B, H, S, S)
                            + m.shift[None, :, None]
                        ).view(-1, H, S, S),
                        -1,
                    )
                    @ v
                ),
                shift=torch.zeros(B, S, S).masked_fill(
                    torch.rand(B, S, S, generator=torch.Generator().manual_seed(1)) > 0.7, -100.0
                ),
            ),
            (q, k, v),
            1,
            False,
        ),
        "bloom-flattened-heads-alibi-baddbmm": (
            Fn(
                lambda m, q, k, v, mask: _flattened_heads(q, k, v, mask, m.alibi),
                alibi=torch.randn(B * H, 1, S, generator=torch.Generator().manual_seed(3)),
            ),
            (q, k, v, torch.zeros(B, 1, 1, S).masked_fill(~_padding()[:, None, None], -1e9)),
            1,
            False,
        ),
        "subtracted-padding-penalty": (
            Fn(
                lambda m, q, k, v, keep: (
                    torch.softmax(
                        q @ k.transpose(-1, -2) * SCALE - (1.0 - keep.float())[:, None, None] * 1e6,
                        -1,
                    )
                    @ v
                )
            ),
            (q, k, v, _padding()),
            1,
            False,
        ),
        "mask-then-scale": (
            Fn(
                lambda m, q, k, v, mask: (
                    torch.softmax((q @ k.transpose(-1, -2) + mask) * SCALE, -1) @ v
                )
            ),
            (q, k, v, torch.randn(B, 1, S, S)),
            1,
            False,
        ),
    }
    return cases


def _flattened_heads(q, k, v, mask, alibi):
    """BLOOM / DeBERTa: scores on ``[B H, S, S]`` (baddbmm with an ALiBi bias), viewed as
    ``[B, H, S, S]`` for the mask and softmax, flattened back for ``bmm`` with v."""
    q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
    scores = torch.baddbmm(alibi, q3, k3.transpose(1, 2), beta=1.0, alpha=SCALE)
    weights = torch.softmax(scores.view(B, H, S, S) + mask, dim=-1)
    return torch.bmm(weights.view(B * H, S, S), v3).view(B, H, S, D)


def _manual_softmax(x, subtract_max):
    if subtract_max:
        x = x - x.amax(dim=-1, keepdim=True)
    e = torch.exp(x)
    return e / e.sum(dim=-1, keepdim=True)


def _repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class _DropoutAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v):
        return self.drop(torch.softmax(q @ k.transpose(-1, -2) * SCALE, -1)) @ v


CASES = _cases()


def test_suite_has_at_least_25_formulations():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", sorted(CASES))
def test_formulation_fuses_exactly(name):
    module, inputs, expected_sites, expected_causal = CASES[name]
    module.eval()
    cm = attnopt.compile(module, inputs)
    fused = cm.graph.find("attention")
    assert len(fused) == expected_sites, cm.explain()
    assert len(cm.sites) == expected_sites
    if expected_causal is not None:
        assert cm.sites[0].causal == expected_causal
    # softmax must be gone: the site really is one op now
    assert not cm.graph.find("softmax")
    with torch.no_grad():
        assert_close(cm(*inputs), module(*inputs))


def test_gqa_is_absorbed_not_repeated():
    module, inputs, _, _ = CASES["gqa-expand-reshape"]
    cm = attnopt.compile(module.eval(), inputs)
    assert cm.sites[0].num_kv_heads == 2 and cm.sites[0].num_heads == 4


def test_relative_bias_is_recorded_as_bias_and_padding_as_mask():
    module, inputs, _, _ = CASES["t5-relative-bias-no-scale"]
    site = attnopt.compile(module.eval(), inputs).sites[0]
    assert site.has_bias and not site.has_mask and site.scale == 1.0
    module, inputs, _, _ = CASES["additive-padding-mask-finfo-min"]
    site = attnopt.compile(module.eval(), inputs).sites[0]
    assert site.has_mask and not site.has_bias


def test_softcap_is_recorded():
    module, inputs, _, _ = CASES["tanh-softcap"]
    site = attnopt.compile(module.eval(), inputs).sites[0]
    assert site.softcap == pytest.approx(5.0)


# --- must not fuse -------------------------------------------------------------------------------
def _refusals():
    q, k, v = _qkv()
    return {
        "weights-returned": (
            Fn(lambda m, q, k, v: _returning_weights(q, k, v)),
            (q, k, v),
            "used 2 times",
        ),
        "weights-reused": (
            Fn(lambda m, q, k, v: _reusing_weights(q, k, v)),
            (q, k, v),
            "used 2 times",
        ),
        "softmax-over-query-axis": (
            Fn(lambda m, q, k, v: torch.softmax(q @ k.transpose(-1, -2) * SCALE, dim=-2) @ v),
            (q, k, v),
            "not the key axis",
        ),
        "per-element-learned-scale": (
            Fn(
                lambda m, q, k, v: torch.softmax(q @ k.transpose(-1, -2) * m.w, -1) @ v,
                w=nn.Parameter(torch.rand(S, S)),
            ),
            (q, k, v),
            "varies per element",
        ),
        "scores-returned": (
            Fn(lambda m, q, k, v: _returning_scores(q, k, v)),
            (q, k, v),
            "also used elsewhere",
        ),
        "fill-value-zero-is-not-a-mask": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(
                        (q @ k.transpose(-1, -2)).masked_fill(torch.eye(S, dtype=torch.bool), 0.0),
                        -1,
                    )
                    @ v
                )
            ),
            (q, k, v),
            "does not mask",
        ),
        "weights-transposed-before-v": (
            Fn(lambda m, q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1).transpose(-1, -2) @ v),
            (q, k, v),
            "not matmul(weights, v)",
        ),
        "weights-rows-regrouped-with-heads": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(q @ k.transpose(-1, -2) * SCALE, -1).reshape(B, H * S, S)
                    @ v[:, 0]
                )
            ),
            (q, k, v),
            "feeds reshape",
        ),
        "constant-shift-inside-softcap": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(
                        torch.tanh((q @ k.transpose(-1, -2) * SCALE + 3.0) / 5.0) * 5.0, -1
                    )
                    @ v
                )
            ),
            (q, k, v),
            "inside soft-capping",
        ),
        "scores-rounded-to-bfloat16": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax((q @ k.transpose(-1, -2) * SCALE).to(torch.bfloat16).float(), -1)
                    @ v
                )
            ),
            (q, k, v),
            "rounds what the fused op would not",
        ),
        "weights-rounded-to-float16": (
            Fn(
                lambda m, q, k, v: (
                    torch.softmax(q @ k.transpose(-1, -2) * SCALE, -1).half().float() @ v
                )
            ),
            (q, k, v),
            "rounds what the fused op would not",
        ),
        "weights-on-the-right": (
            Fn(lambda m, q, k, v: v.transpose(-1, -2) @ torch.softmax(q @ k.transpose(-1, -2), -1)),
            (q, k, v),
            "not matmul(weights, v)",
        ),
        "exp-instead-of-softmax-sum-over-other-axis": (
            Fn(
                lambda m, q, k, v: (
                    (lambda e: e / e.sum(dim=-2, keepdim=True))(torch.exp(q @ k.transpose(-1, -2)))
                    @ v
                )
            ),
            (q, k, v),
            None,
        ),
    }


def _returning_weights(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2) * SCALE, -1)
    return p @ v, p


def _reusing_weights(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2) * SCALE, -1)
    return p @ v + p.sum(-1, keepdim=True)


def _returning_scores(q, k, v):
    s = q @ k.transpose(-1, -2) * SCALE
    return torch.softmax(s, -1) @ v, s


REFUSALS = _refusals()


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_must_not_fuse(name):
    module, inputs, reason = REFUSALS[name]
    cm = attnopt.compile(module.eval(), inputs)
    assert cm.graph.find("attention") == []
    if reason is not None:
        assert any(reason in why for _, why in cm.explain()), cm.explain()
    with torch.no_grad():
        expected, actual = module(*inputs), cm(*inputs)
    for a, e in zip(
        actual if isinstance(actual, tuple) else (actual,),
        expected if isinstance(expected, tuple) else (expected,),
    ):
        assert_close(a, e)


def test_training_mode_dropout_is_not_fused():
    q, k, v = _qkv()
    module = _DropoutAttention().train()
    with pytest.warns(UserWarning, match="training mode"):
        cm = attnopt.compile(module, (q, k, v))
    assert cm.graph.find("attention") == []
    assert cm.explain()


def test_constant_sliding_window_mask_becomes_exact_window_variant():
    from attnopt.ir.attention_reference import visible_keys_mask

    q, k, v = _qkv(q_len=S, kv_len=S)
    band = visible_keys_mask(S, S, window_left=3, window_right=0)
    module = Fn(
        lambda m, q, k, v: (
            torch.softmax((q @ k.transpose(-1, -2) * SCALE).masked_fill(~m.band, float("-inf")), -1)
            @ v
        ),
        band=band,
    )
    cm = attnopt.compile(module.eval(), (q, k, v))
    node = cm.graph.find("attention")[0]
    assert node.attrs.variant == "sliding_window" and node.attrs.causal
    assert (node.attrs.window_left, node.attrs.window_right) == (3, 0)
    assert cm.sites[0].kept_fraction < 1.0 and not cm.sites[0].has_mask
    with torch.no_grad():
        assert_close(cm(q, k, v), module(q, k, v))
    for lossy in ("linearize", "block-sparse{block=4,density=0.5}", "sliding-window{window=2}"):
        again = attnopt.compile(
            module.eval(), (q, k, v), passes=f"canonicalize,fuse-attention,{lossy}"
        )
        notes = [n for record in again.history for n in record["notes"]]
        assert "site 0: already sliding_window: left as it is" in notes, lossy
        assert [s.variant for s in again.sites] == ["sliding_window"]


def test_mistral_sliding_window_is_recognised_exactly():
    import transformers

    config = transformers.MistralConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        sliding_window=6,
        use_cache=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.MistralModel(config).eval()
    ids = torch.randint(3, 90, (1, 24), generator=torch.Generator().manual_seed(0))
    cm = attnopt.compile(model, (), {"input_ids": ids})
    assert [n.attrs.window_left for n in cm.graph.find("attention")] == [5, 5]
    assert attnopt.validate(model, cm, (), {"input_ids": ids}, sites=False).ok


_MIN = torch.finfo(torch.float32).min


def _fill_padding(q, k, v, keep):
    scores = q @ k.transpose(-1, -2) * SCALE
    return torch.softmax(scores.masked_fill(~keep[:, None, None, :], -1e4), -1) @ v


def _fill_causal_and_left_padding(q, k, v, keep):
    scores = (q @ k.transpose(-1, -2) * SCALE).masked_fill(~TRIL, _MIN)
    return torch.softmax(scores.masked_fill(~keep[:, None, None, :], _MIN), -1) @ v


@pytest.mark.parametrize(
    "fn, padded",
    [(_fill_padding, slice(None)), (_fill_causal_and_left_padding, slice(0, 3))],
    ids=["one-finite-fill-all-keys-masked", "causal-and-left-padding-fills"],
)
def test_rows_whose_keys_are_all_filled_average_v_as_eager(fn, padded):
    """A finite fill replaces every score of a fully masked row: eager's softmax is uniform there
    (the mean of v), not zeros and not the unmasked softmax."""
    q, k, v = _qkv()
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, padded] = False
    model = Fn(lambda m, q, k, v, keep: fn(q, k, v, keep))
    cm = attnopt.compile(model, (q, k, v, keep), passes="exact")
    assert len(cm.sites) == 1
    expected = model(q, k, v, keep)
    assert_close(cm(q, k, v, keep), expected)
    assert_close(expected[1, :, 0], v[1].mean(-2))


def test_a_constant_mask_that_masks_nothing_is_dropped():
    """ViT/DeiT in transformers 5 add an all-zero constant mask: the fused op gets no mask, so the
    lossy passes (which refuse non-padding masks) still apply."""
    q, k, v = _qkv()
    model = Fn(
        lambda m, q, k, v: torch.softmax(q @ k.transpose(-1, -2) * SCALE + m.zeros, -1) @ v,
        zeros=torch.zeros(B, 1, S, S),
    )
    cm = attnopt.compile(model, (q, k, v), passes="exact")
    (node,) = cm.graph.find("attention")
    assert node.inputs[3] is None
    assert_close(cm(q, k, v), model(q, k, v))
    linear = attnopt.compile(model, (q, k, v), passes="canonicalize,fuse-attention,linearize")
    assert [s.variant for s in linear.sites] == ["linear"]


def _nan_zero_where(w):
    return torch.where(torch.isnan(w), 0.0, w)


def _nan_zero_fill(w):
    return w.masked_fill(w.isnan(), 0)


@pytest.mark.parametrize("zero", [_nan_zero_where, _nan_zero_fill], ids=["where", "masked_fill"])
def test_nan_weights_zeroed_before_v(zero):
    """``where(isnan(w), 0, w) @ v`` (exporters' SDPA decomposition, or written by hand) fuses
    with ``nan_weights_zero``: a fully masked row, a NaN query and an inf key give eager's
    zeros, NaN and finite values in the same places."""

    def fn(_module, q, k, v, keep):
        s = (q @ k.transpose(-1, -2) * SCALE).masked_fill(~keep, float("-inf"))
        return zero(torch.softmax(s, dim=-1)) @ v

    q, k, v = _qkv()
    keep = _padding()[:, None, None, :].expand(B, 1, S, S).clone()
    keep[1, :, 4] = False  # query 4 of sequence 1 sees no key: NaN weights in eager
    model = Fn(fn).eval()
    cm = attnopt.compile(model, (q, k, v, keep), dynamic=False)
    assert len(cm.sites) == 1 and cm.graph.find("attention")[0].attrs.nan_weights_zero
    nan_q, inf_k = q.clone(), k.clone()
    nan_q[0, 1, 2, 3] = float("nan")
    inf_k[1, 2, 5, 0] = float("inf")
    for inputs in ((q, k, v, keep), (nan_q, k, v, keep), (q, inf_k, v, keep)):
        expected, actual = model(*inputs), cm(*inputs)
        assert torch.equal(expected.isnan(), actual.isnan())
        assert_close(actual.nan_to_num(), expected.nan_to_num())
    assert bool(model(nan_q, k, v, keep).isfinite().all())  # the NaN row was zeroed
