"""Sparsification and linearization passes end to end: degenerate settings are exact, sparse
settings compute what the reference with the same visibility computes, masks still apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.ir.attention_reference import attention_reference, visible_keys_mask
from attnopt.tolerances import assert_close
from tests import zoo
from tests.helpers import assert_matches_eager, zoo_model

FUSE = "canonicalize,fuse-attention,"


class Attn(nn.Module):
    """Plain attention with an optional key-padding mask and causal rule."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v, keep=None):
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if self.causal:
            tri = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
            scores = scores.masked_fill(~tri, float("-inf"))
        if keep is not None:
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        return torch.softmax(scores, -1) @ v


def _inputs(q_len=40, kv_len=40, heads=2, batch=2, dim=8, padded=True):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, heads, kv_len, dim, generator=g)
    v = torch.randn(batch, heads, kv_len, dim, generator=g)
    keep = torch.ones(batch, kv_len, dtype=torch.bool)
    if padded:
        keep[1, -7:] = False
    return q, k, v, keep


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len, kv_len", [(40, 40), (24, 40)])
def test_sliding_window_with_sinks_matches_reference(causal, q_len, kv_len):
    q, k, v, keep = _inputs(q_len, kv_len)
    cm = attnopt.compile(
        Attn(causal), (q, k, v, keep), passes=FUSE + "sliding-window{window=5,sinks=2}"
    )
    assert cm.sites[0].variant == "sliding_window"
    right = 0 if causal else 5
    visible = visible_keys_mask(q_len, kv_len, window_left=5, window_right=right, sinks=2)
    expected = attention_reference(
        q, k, v, mask=keep[:, None, None, :], causal=causal, visible=visible, scale=8**-0.5
    )
    assert_close(cm(q, k, v, keep), expected)
    assert cm.sites[0].kept_fraction < 0.5


def test_sliding_window_wider_than_sequence_is_exact():
    for name in ("bert", "gpt2", "llama"):
        model = zoo_model(name, "eager")
        args, kwargs = zoo.get(name).example(2, 12)
        cm = attnopt.compile(model, args, kwargs, passes=FUSE + "sliding-window{window=64}")
        assert {s.variant for s in cm.sites} == {"sliding_window"}
        assert_matches_eager(model, cm, args, kwargs)


def test_block_sparse_density_one_is_exact():
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(2, 24)
    cm = attnopt.compile(model, args, kwargs, passes=FUSE + "block-sparse{block=8,density=1.0}")
    assert {s.variant for s in cm.sites} == {"block_sparse"}
    assert_matches_eager(model, cm, args, kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_topk_routing_matches_routed_reference(causal):
    from attnopt.ir.block_routing import route_blocks
    from attnopt.ir.block_sparse import block_meta_visible

    q, k, v, keep = _inputs(48, 48)
    cm = attnopt.compile(
        Attn(causal), (q, k, v, keep), passes=FUSE + "block-sparse{block=8,density=0.5}"
    )
    site = cm.sites[0]
    assert site.variant == "block_sparse" and site.kept_fraction == 0.5
    meta = route_blocks(
        q, k, block=8, density=0.5, causal=causal, mask=keep[:, None, None, :], scale=8**-0.5
    )
    visible = block_meta_visible(meta, 48, 48)
    expected = attention_reference(
        q, k, v, mask=keep[:, None, None, :], causal=causal, visible=visible, scale=8**-0.5
    )
    assert_close(cm(q, k, v, keep), expected)


def test_block_sparse_static_pattern_from_calibration():
    q, k, v, keep = _inputs(48, 48, padded=False)
    calibration = [((q * s, k, v, keep), {}) for s in (1.0, 0.5)]
    cm = attnopt.compile(
        Attn(),
        (q, k, v, keep),
        calibration=calibration,
        passes=FUSE + "block-sparse{block=8,density=0.25,routing=static}",
    )
    node = cm.graph.find("attention")[0]
    assert len(node.inputs) == 7 and node.inputs[5] is not None  # kv_counts, kv_indices as params
    assert cm.sites[0].kept_fraction <= 0.5
    out = cm(q, k, v, keep)
    dense = Attn()(q, k, v, keep)
    assert out.shape == dense.shape and not torch.allclose(out, dense)


def test_static_routing_without_matching_calibration_fails_clearly():
    q, k, v, keep = _inputs(48, 48)
    with pytest.raises(attnopt.PassError, match="shape"):
        attnopt.compile(
            Attn(),
            (q, k, v, keep),
            calibration=[((q[:, :, :8], k, v, keep), {})],
            passes=FUSE + "block-sparse{block=8,density=0.25,routing=static}",
        )


def test_min_len_keeps_short_sites_dense():
    q, k, v, keep = _inputs(16, 16)
    cm = attnopt.compile(
        Attn(), (q, k, v, keep), passes=FUSE + "block-sparse{block=8,density=0.5,min_len=32}"
    )
    assert cm.sites[0].variant == "dense"


def test_neighborhood_on_vit_grid_is_inferred_and_exact_when_kernel_covers_grid():
    model = zoo_model("vit", "eager")
    args, kwargs = zoo.get("vit").example(2, 0)
    cm = attnopt.compile(model, args, kwargs, passes=FUSE + "neighborhood{kernel=7}")
    site = cm.sites[0]
    assert site.variant == "neighborhood"
    node = cm.graph.find("attention")[0]
    assert node.attrs.grid == (4, 4) and node.attrs.num_global == 1
    assert_matches_eager(model, cm, args, kwargs)  # kernel clamped to the 4x4 grid: dense


def test_neighborhood_small_kernel_changes_results_and_reports_fraction():
    model = zoo_model("vit", "eager")
    args, kwargs = zoo.get("vit").example(2, 0)
    cm = attnopt.compile(model, args, kwargs, passes=FUSE + "neighborhood{kernel=3}")
    assert all(s.kept_fraction < 1.0 for s in cm.sites)
    report = attnopt.validate(model, cm, args, kwargs, tolerance=attnopt.Budget(cosine=0.5))
    assert report.metrics["last_hidden_state"]["cosine"] < 1.0


def test_linearize_every_site_and_selective_count():
    model = zoo_model("minilm", "eager")
    args, kwargs = zoo.get("minilm").example(2, 16)
    full = attnopt.compile(model, args, kwargs, passes=FUSE + "linearize")
    assert {s.variant for s in full.sites} == {"linear"}
    two = attnopt.compile(model, args, kwargs, passes=FUSE + "linearize{count=2}")
    assert sum(s.variant == "linear" for s in two.sites) == 2
    notes = " ".join(n for record in two.history for n in record["notes"])
    assert "sensitivity" in notes
    cos = {
        label: attnopt.validate(
            model, cm, args, kwargs, tolerance=attnopt.Budget(cosine=0.1), sites=False
        ).metrics["last_hidden_state"]["cosine"]
        for label, cm in (("full", full), ("two", two))
    }
    assert cos["two"] > cos["full"]


def test_linearize_budget_is_respected():
    model = zoo_model("minilm", "eager")
    args, kwargs = zoo.get("minilm").example(2, 16)
    cm = attnopt.compile(model, args, kwargs, passes=FUSE + "linearize{budget=0.99}")
    report = attnopt.validate(
        model, cm, args, kwargs, tolerance=attnopt.Budget(cosine=0.99), sites=False
    )
    assert report.ok, report


def test_hybrid_with_window_covering_sequence_is_exact():
    q, k, v, keep = _inputs(32, 32)
    cm = attnopt.compile(Attn(), (q, k, v, keep), passes=FUSE + "linearize{local_window=64}")
    assert cm.sites[0].variant == "hybrid"
    assert_close(cm(q, k, v, keep), Attn()(q, k, v, keep))


def test_sensitivity_reports_every_site():
    model = zoo_model("minilm", "eager")
    args, kwargs = zoo.get("minilm").example(2, 16)
    rows = attnopt.sensitivity(model, attnopt.passes.Linearize(), [(args, kwargs)])
    assert [r["site"] for r in rows] == list(range(6))
    assert all(0 < r["cosine"] < 1 for r in rows)


def test_block_sparse_query_block_option():
    q, k, v, keep = _inputs(64, 64)
    cm = attnopt.compile(
        Attn(), (q, k, v, keep), passes=FUSE + "block-sparse{block=8,query_block=16,density=1.0}"
    )
    assert cm.graph.find("attention")[0].attrs.query_block == 16
    assert_close(cm(q, k, v, keep), Attn()(q, k, v, keep))


@pytest.mark.parametrize("name", ["bert", "llama", "vit", "minilm"])
def test_head_prune_slices_weights(name):
    model = zoo_model(name, "eager")
    args, kwargs = zoo.get(name).example(2, 12)
    full = attnopt.compile(model, args, kwargs, passes=FUSE + "head-prune{keep=1.0}")
    assert_matches_eager(model, full, args, kwargs)
    half = attnopt.compile(model, args, kwargs, passes=FUSE + "head-prune{keep=0.5}")
    before = [s.num_heads for s in full.sites]
    assert [s.num_heads for s in half.sites] == [h // 2 for h in before]
    assert all(s.heads_kept == h // 2 for s, h in zip(half.sites, before))
    pruned = [n for n in half.graph.tensors if n.endswith(".pruned")]
    assert pruned, "weights must be sliced, not masked"
    with torch.no_grad():
        out = zoo.primary_output(half(*args, **kwargs))
    assert out.shape == zoo.primary_output(model(*args, **kwargs)).shape


def test_head_prune_refuses_fused_qkv_with_a_reason():
    model = zoo_model("gpt2", "eager")
    args, kwargs = zoo.get("gpt2").example(2, 12)
    cm = attnopt.compile(model, args, kwargs, passes=FUSE + "head-prune{keep=0.5}")
    assert [s.num_heads for s in cm.sites] == [4, 4]
    notes = " ".join(n for record in cm.history for n in record["notes"])
    assert "not pruned" in notes
    assert_matches_eager(model, cm, args, kwargs)


@pytest.mark.parametrize(
    "pipeline",
    ["sliding-window{window=4,sinks=1,heads=[0,2]}", "block-sparse{block=8,density=0.5,heads=[1]}"],
)
def test_per_head_configuration(pipeline):
    q, k, v, keep = _inputs(32, 32, heads=4)
    cm = attnopt.compile(Attn(), (q, k, v, keep), passes=FUSE + pipeline)
    node = cm.graph.find("attention")[0]
    assert node.attrs.heads
    out = cm(q, k, v, keep)
    dense = Attn()(q, k, v, keep)
    untouched = [h for h in range(4) if h not in node.attrs.heads]
    assert_close(out[:, untouched], dense[:, untouched])
    assert not torch.allclose(out[:, list(node.attrs.heads)], dense[:, list(node.attrs.heads)])
    if node.attrs.variant == "sliding_window":
        visible = visible_keys_mask(32, 32, window_left=4, window_right=4, sinks=1)
        expected = attention_reference(
            q, k, v, mask=keep[:, None, None, :], visible=visible, scale=8**-0.5
        )
        assert_close(out[:, [0, 2]], expected[:, [0, 2]])


def test_per_head_option_is_checked():
    with pytest.raises(attnopt.PipelineError, match="heads"):
        attnopt.PassManager.parse("sliding-window{window=4,heads=[1,1]}")


class _HeadMixingAttention(torch.nn.Module):
    """Self-attention whose queries pass through ``roll`` over the head axis (an opaque op that
    mixes heads, so slicing heads away would change the kept heads' inputs)."""

    def __init__(self, mix: bool, heads: int = 4, dim: int = 32):
        super().__init__()
        self.mix, self.heads = mix, heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        batch, seq, dim = x.shape

        def split(t):
            return t.view(batch, seq, -1, dim // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.mix:
            q = torch.roll(q, 1, dims=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(batch, seq, -1))


@pytest.mark.parametrize("mix", [False, True])
def test_head_prune_refuses_ops_that_mix_heads(mix):
    torch.manual_seed(0)
    model = _HeadMixingAttention(mix).eval()
    x = torch.randn(2, 10, 32)
    cm = attnopt.compile(model, (x,), passes=FUSE + "head-prune{keep=0.5}")
    notes = " ".join(n for record in cm.history for n in record["notes"])
    if mix:
        assert [s.num_heads for s in cm.sites] == [4]
        assert "mixes heads" in notes
        assert_close(cm(x), model(x))
    else:
        assert [s.num_heads for s in cm.sites] == [2], notes


class _SequenceInferredAttention(torch.nn.Module):
    """OPT's layout: ``view(batch, -1, heads, head_dim)`` lets -1 stand for the sequence, so slicing
    the projections would silently halve the tokens instead of the heads."""

    def __init__(self, heads: int = 4, dim: int = 32):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, mask):
        batch, seq, dim = x.shape

        def split(t):
            return t.view(batch, -1, self.heads, dim // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), mask
        )
        return self.o(out.transpose(1, 2).reshape(batch, seq, dim))


@pytest.mark.parametrize("masked", [False, True])
def test_head_prune_refuses_a_layout_that_would_slice_tokens(masked):
    torch.manual_seed(0)
    model = _SequenceInferredAttention().eval()
    x = torch.randn(2, 10, 32)
    mask = torch.zeros(2, 1, 10, 10) if masked else None
    cm = attnopt.compile(model, (x, mask), passes=FUSE + "head-prune{keep=0.5}")
    notes = " ".join(n for record in cm.history for n in record["notes"])
    assert "not pruned" in notes
    assert [s.num_heads for s in cm.sites] == [4]
    assert [s.heads_kept for s in cm.sites] == [None]
    assert_close(cm(x, mask), model(x, mask))


class _AdditiveMaskAttention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask, dim=-1) @ v


def test_block_sparse_full_density_keeps_rows_that_an_additive_mask_hides_entirely():
    """HF's finfo.min masks: a row whose every key is masked is uniform over all keys in eager;
    routing must not drop the blocks that mask hides for such rows."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    keep = torch.ones(24, 24, dtype=torch.bool)
    keep[:, 16:] = False
    keep[16:, :] = False
    mask = torch.zeros(1, 1, 24, 24).masked_fill(~keep, torch.finfo(torch.float32).min)
    model = _AdditiveMaskAttention()
    cm = attnopt.compile(model, (q, k, v, mask), passes=FUSE + "block-sparse{block=8,density=1.0}")
    assert [s.variant for s in cm.sites] == ["block_sparse"]
    assert_close(cm(q, k, v, mask), model(q, k, v, mask))
