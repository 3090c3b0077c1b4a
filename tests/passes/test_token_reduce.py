"""token-merge (ToMe) and token-prune (EViT): fewer tokens after chosen layers.

Degenerate settings are exact on every encoder of the zoo; merging or pruning only padding is
exact at the real positions (the whole rewrite: layouts, masks, sizes and unmerging); padding
never merges into real tokens; outputs keep their shapes; causal sites are refused.
"""

import math
import warnings

import pytest
import torch

import attnopt
from attnopt import zoo
from attnopt.errors import PassError, PipelineError
from attnopt.ir.token_reduce import (
    TokenMergeAttrs,
    TokenPruneAttrs,
    merge_tokens,
    prune_tokens,
    unmerge_tokens,
)
from attnopt.passes import TokenMerge, TokenPrune
from attnopt.zoo import primary_output
from tests.helpers import assert_matches_eager, zoo_model

BASE = "canonicalize,fuse-attention"
ENCODERS = ["bert", "vit", "minilm", "encoder_layer"]


def _build(name):
    return zoo_model(name, "sdpa" if zoo.get(name).hf else None)


def _history(cm, name):
    return [r for r in cm.history if r["pass"] == name][0]


# -- the ops -------------------------------------------------------------------------------------
def _groups(source):
    """Original positions per merged token, per row."""
    rows = []
    for row in source.tolist():
        groups = {}
        for position, token in enumerate(row):
            groups.setdefault(token, []).append(position)
        rows.append(groups)
    return rows


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("protect", [0, 1, 3])
def test_merge_keeps_mass_and_never_mixes_padding_with_real_tokens(seed, protect):
    gen = torch.Generator().manual_seed(seed)
    batch, n, channels = 3, 21, 5
    x = torch.randn(batch, n, channels, generator=gen)
    keys = torch.randn(batch, 2, n, 4, generator=gen)
    lengths = torch.tensor([n, 13, 8])
    valid = torch.arange(n)[None, :] < lengths[:, None]
    size, source = None, None
    for r in (4, 3, 2):  # three merges in a row, padding kept at the end
        attrs = TokenMergeAttrs(r=r, protect=protect)
        before = x.shape[1]
        x_new, size_new, source = merge_tokens(x, keys, size, valid, source, attrs)
        size_in = valid.float() if size is None else size
        assert x_new.shape == (batch, before - r, channels)
        # sizes add up, and so does every feature weighted by size (a size-weighted mean)
        torch.testing.assert_close(size_new.sum(1), size_in.sum(1))
        torch.testing.assert_close(
            (x_new * size_new[..., None]).sum(1), (x * size_in[..., None]).sum(1)
        )
        x, size, valid = x_new, size_new, None
        keys = torch.randn(batch, 2, x.shape[1], 4, generator=gen)
    real = torch.arange(n)[None, :] < lengths[:, None]
    for b, groups in enumerate(_groups(source)):
        for members in groups.values():
            kinds = {bool(real[b, p]) for p in members}
            assert len(kinds) == 1, f"row {b}: padding merged with real tokens: {members}"
        for p in range(protect):
            assert groups[source[b, p].item()] == [p], "a protected token merged"
    # every original position unmerges to the vector of the token it is in
    full = unmerge_tokens(x, source)
    assert full.shape == (batch, n, channels)
    torch.testing.assert_close(full, x.gather(1, source[..., None].expand(-1, -1, channels)))


def test_merge_r_zero_and_keep_one_are_the_identity():
    x, keys = torch.randn(2, 9, 4), torch.randn(2, 3, 9, 2)
    for attrs in (TokenMergeAttrs(r=0), TokenMergeAttrs(keep=1.0)):
        out, size, source = merge_tokens(x, keys, None, None, None, attrs)
        assert torch.equal(out, x) and torch.equal(size, torch.ones(2, 9))
        assert torch.equal(source, torch.arange(9).expand(2, 9))


def test_merge_merges_the_most_similar_pair():
    # tokens 3 and 4 have the same key: with r=1 they are the pair that merges
    keys = torch.eye(8)[None, None].clone()
    keys[..., 4, :] = keys[..., 3, :]
    x = torch.arange(8, dtype=torch.float32)[None, :, None]
    out, size, source = merge_tokens(x, keys, None, None, None, TokenMergeAttrs(r=1, protect=1))
    assert source[0, 3] == source[0, 4]
    assert out[0, source[0, 3], 0] == 3.5 and size[0, source[0, 3]] == 2


def _cls_attention(q, k, valid, scale):
    scores = (q[:, :, :1] @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], -math.inf)
    return scores.softmax(-1).mean(1)[:, 0]


@pytest.mark.parametrize("fuse", [True, False])
def test_prune_keeps_what_cls_attends_to_and_fuses_the_rest(fuse):
    gen = torch.Generator().manual_seed(3)
    batch, n, channels = 2, 11, 6
    x = torch.randn(batch, n, channels, generator=gen)
    q, k = torch.randn(batch, 2, n, 4, generator=gen), torch.randn(batch, 2, n, 4, generator=gen)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, 7:] = False
    attrs = TokenPruneAttrs(keep=0.5, protect=1, fuse=fuse, scale=0.5)
    out, size, source = prune_tokens(x, q, k, None, valid, None, attrs)
    attention = _cls_attention(q, k, valid, 0.5)
    keep = math.ceil(0.5 * (n - 1))
    assert out.shape[1] == 1 + keep + (1 if fuse else 0)
    for b in range(batch):
        ranked = [i for i in range(1, n) if valid[b, i]] + [
            i for i in range(1, n) if not valid[b, i]
        ]
        ranked.sort(key=lambda i: -(attention[b, i].item() if valid[b, i] else -1.0))
        kept = sorted(ranked[:keep])
        torch.testing.assert_close(out[b, 1 : 1 + keep], x[b, kept])
        pruned = sorted(ranked[keep:])
        if fuse:
            w = attention[b, pruned] * valid[b, pruned]
            torch.testing.assert_close(out[b, -1], (x[b, pruned] * w[:, None]).sum(0) / w.sum())
            assert size[b, -1] == valid[b, pruned].sum()
            assert all(source[b, p] == out.shape[1] - 1 for p in pruned)
        else:
            assert all(source[b, p] == -1 for p in pruned)
            assert unmerge_tokens(out, source)[b, pruned].abs().max() == 0
    # padded tokens go first: row 1 keeps 5 of its 6 real tokens and no padding
    assert bool(size[1, 1 : 1 + keep].gt(0).all())


def test_prune_received_ranks_by_the_attention_every_real_query_gives():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 9, 3, generator=gen)
    q, k = torch.randn(1, 1, 9, 4, generator=gen), torch.randn(1, 1, 9, 4, generator=gen)
    attrs = TokenPruneAttrs(keep=0.3, protect=0, rank="received", fuse=False, scale=1.0)
    out, _, source = prune_tokens(x, q, k, None, None, None, attrs)
    received = (q[0, 0] @ k[0, 0].T).softmax(-1).sum(0)
    kept = received.topk(3).indices.sort().values
    torch.testing.assert_close(out[0], x[0, kept])


# -- whole models --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("option", ["token-merge{r=0}", "token-prune{keep=1.0}"])
def test_degenerate_settings_equal_eager_on_every_encoder(name, option):
    model = _build(name)
    args, kwargs = zoo.get(name).example(2, 12)
    cm = attnopt.compile(model, args, kwargs, passes=f"{BASE},{option}")
    history = _history(cm, option.split("{")[0])
    assert history["changed"], history["notes"]
    assert "token_merge" in str(cm.graph) or "token_prune" in str(cm.graph)
    assert_matches_eager(model, cm, args, kwargs)


def _padded(entry, batch, seq, real):
    args, kwargs = entry.example(batch, seq)
    kwargs = dict(kwargs)
    kwargs["attention_mask"] = (torch.arange(seq)[None, :] < real).long().expand(batch, seq)
    return args, kwargs


@pytest.mark.parametrize("name", ["bert", "minilm"])
@pytest.mark.parametrize(
    "option",
    [
        "token-merge{r=3,layers=[0,1]}",
        "token-merge{r=2,layers=[0,1],proportional=false}",
        "token-prune{keep=0.6,layers=[0,1]}",
    ],
)
def test_reducing_only_padding_is_exact_at_real_positions(name, option):
    """Every row has enough padding for the whole schedule: only padding merges (or is pruned),
    so the real tokens' results equal eager's. This checks the rewrite end to end."""
    entry = zoo.get(name)
    model = _build(name)
    args, kwargs = _padded(entry, 2, 24, 10)
    cm = attnopt.compile(model, args, kwargs, passes=f"{BASE},{option}", strict=True)
    assert min(s.tokens_kept for s in cm.sites) < 1.0
    with torch.no_grad():
        expected = primary_output(model(*args, **kwargs))[:, :10]
        got = primary_output(cm(*args, **kwargs))[:, :10]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["bert", "vit"])
@pytest.mark.parametrize("option", ["token-merge{ratio=0.5}", "token-prune{keep=0.5}"])
def test_reduction_keeps_shapes_runs_any_shape_and_reports_tokens_kept(name, option):
    entry = zoo.get(name)
    model = _build(name)
    args, kwargs = entry.example(2, 16)
    cm = attnopt.compile(model, args, kwargs, passes=f"{BASE},{option}", strict=True)
    kept = [s.tokens_kept for s in cm.sites]
    assert kept[0] == 1.0 and kept[-1] < 1.0 and kept == sorted(kept, reverse=True)
    assert "token_unmerge" in str(cm.graph)
    for batch, seq in ((2, 16), (3, 20)):
        a, k = entry.example(batch, seq)
        with torch.no_grad():
            expected = model(*a, **k)
            got = cm(*a, **k)
        assert primary_output(got).shape == primary_output(expected).shape
        assert bool(torch.isfinite(primary_output(got)).all())
    if name != "vit":  # a ViT's token count is fixed by its image size
        assert cm.stats["mode"] == "symbolic"


def test_later_layers_really_run_on_fewer_tokens():
    entry = zoo.get("bert")
    model = _build("bert")
    args, kwargs = entry.example(2, 16)
    cm = attnopt.compile(model, args, kwargs, passes=f"{BASE},token-merge{{r=4,layers=[0]}}")
    linears = [n for n in cm.graph.nodes if n.op == "linear"]
    reduced = [n for n in linears if "ntr0" in str(n.output.shape)]
    # layer 0's MLP (2) and all of layer 1 (q, k, v, out, 2 MLP) run on the merged tokens
    assert len(reduced) == 8, [str(n.output.shape) for n in linears]


@pytest.mark.parametrize(
    "name, option", [("gpt2", "token-merge{r=2}"), ("llama", "token-prune{keep=0.5}")]
)
def test_causal_sites_are_refused_with_the_reason(name, option):
    entry = zoo.get(name)
    model = _build(name)
    args, kwargs = entry.example(2, 12)
    passes = f"{BASE},{option}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = attnopt.compile(model, args, kwargs, passes=passes, dynamic=False)
    assert not _history(cm, option.split("{")[0])["changed"]
    assert any("causality" in str(w.message) for w in caught)
    assert_matches_eager(model, cm, args, kwargs)
    with pytest.raises(PassError, match="causality"):
        attnopt.compile(model, args, kwargs, passes=passes, strict=True, dynamic=False)


@pytest.mark.parametrize(
    "text, match",
    [
        ("token-merge{ratio=0}", "ratio"),
        ("token-merge{ratio=1.5}", "ratio"),
        ("token-merge{r=-1}", "r="),
        ("token-merge{r=2,ratio=0.5}", "not both"),
        ("token-merge{layers=[-1]}", "layers"),
        ("token-prune{keep=0}", "keep"),
        ("token-prune{keep=2.0}", "keep"),
        ("token-prune{rank=best}", "rank"),
        ("token-prune{protect=0}", "protect"),
    ],
)
def test_bad_options_fail_at_parse_time(text, match):
    with pytest.raises(PipelineError, match=match):
        attnopt.passes.PassManager.parse(text)


def test_r_beyond_half_the_tokens_and_a_protected_prefix_too_long_are_pipeline_errors():
    entry = zoo.get("bert")
    model = _build("bert")
    args, kwargs = entry.example(2, 12)
    with pytest.raises(PipelineError, match="r=9"):
        attnopt.compile(model, args, kwargs, passes=f"{BASE},token-merge{{r=9}}")
    with pytest.raises(PipelineError, match="protect=12"):
        attnopt.compile(model, args, kwargs, passes=f"{BASE},token-prune{{protect=12}}")


def test_layers_out_of_range_are_told():
    entry = zoo.get("bert")
    model = _build("bert")
    args, kwargs = entry.example(2, 12)
    with pytest.raises(PipelineError, match=r"layers=\[7\]"):
        attnopt.compile(model, args, kwargs, passes=f"{BASE},token-merge{{layers=[7]}}")


def test_passes_are_public_and_parse_back():
    assert str(TokenMerge(ratio=0.5, layers=(2, 3))) == "token-merge{ratio=0.5,layers=[2,3]}"
    assert attnopt.passes.PassManager.parse(str(TokenPrune(keep=0.7))).passes[0] == TokenPrune(
        keep=0.7
    )


@pytest.mark.parametrize(
    "option",
    ["token-merge{r=2}", "token-merge{ratio=0.5}", "token-prune{keep=0.5}"],
)
def test_after_remove_padding_each_row_reduces_its_own_tokens(option):
    """With the padding removed, a batch reduces each row as the model run on that row alone
    (no padding) does: per row, not one count for the whole batch."""
    entry = zoo.get("bert")
    model = _build("bert")
    args, kwargs = entry.example(3, 16)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 11:] = 0
    mask[2, 6:] = 0
    kwargs = dict(kwargs, attention_mask=mask)
    cm = attnopt.compile(model, args, kwargs, passes=f"{BASE},remove-padding,{option}", strict=True)
    graph = str(cm.graph)
    assert "token_merge_packed" in graph or "token_prune_packed" in graph
    with torch.no_grad():
        got = primary_output(cm(*args, **kwargs))
        for row in range(3):
            length = int(mask[row].sum())
            alone = {name: value[row : row + 1, :length] for name, value in kwargs.items()}
            single = attnopt.compile(
                model, (), alone, passes=f"{BASE},{option}", strict=True, dynamic=False
            )
            want = primary_output(single(**alone))[0]
            torch.testing.assert_close(got[row, :length], want, rtol=1e-4, atol=1e-5)
            assert got[row, length:].abs().max() == 0 if length < 16 else True


@pytest.mark.parametrize(
    "name, reason",
    [("swin", "attention bias"), ("mha", "between the attention block and its MLP")],
)
def test_encoders_it_cannot_reduce_stay_exact_and_say_why(name, reason):
    model = _build(name)
    args, kwargs = zoo.get(name).example(2, 12)
    cm = attnopt.compile(model, args, kwargs, passes=f"{BASE},token-merge{{r=0}}", dynamic=False)
    history = _history(cm, "token-merge")
    assert not history["changed"] and any(reason in why for _, why in history["declined"])
    assert_matches_eager(model, cm, args, kwargs)


@pytest.mark.parametrize("option", ["", ",token-merge{ratio=0.5}"])
def test_validate_compares_every_site_on_packed_and_merged_tokens(option):
    """Sites running on packed (and merged) tokens are compared per site, in the model's
    layout: exact after remove-padding alone, an error where the tokens were merged."""
    entry = zoo.get("bert")
    model = _build("bert")
    args, kwargs = entry.example(2, 16)
    cm = attnopt.compile(model, args, kwargs, passes=f"{BASE},remove-padding{option}")
    report = attnopt.validate(model, cm, args, kwargs, tolerance=attnopt.Budget(cosine=0.5))
    assert len(report.sites) == 2, report.warnings
    errors = [site.metrics["max_abs"] for site in report.sites]
    assert errors[0] < 1e-5  # the first layer's attention runs before any merge
    assert (errors[1] > 1e-3) == bool(option)
    assert not any("not compared" in w for w in report.warnings)
