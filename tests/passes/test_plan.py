"""Plans (``attnopt.Plan``): calibrating passes record their decisions, a replay applies them without
running the graph, the JSON round-trips, and a plan that does not fit fails with PlanError before
anything is rewritten."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from torch import nn

import attnopt
from attnopt.passes.plan import Plan
from tests import zoo
from tests.helpers import zoo_model

FUSE = "canonicalize,fuse-attention,"
PRUNE = FUSE + "head-prune{keep=0.5}"
STATIC = FUSE + "block-sparse{block=8,density=0.25,routing=static}"


def _no_executor(*args, **kwargs):
    raise AssertionError("a replayed plan must not run the graph")


def _bert_inputs(batch: int = 2, seq: int = 12):
    return zoo.get("bert").example(batch, seq)


@functools.cache
def _recorded(pipeline: str = PRUNE) -> tuple[nn.Module, attnopt.CompiledModule]:
    """The zoo BERT compiled with calibration (once per process; tests only read it)."""
    model = zoo_model("bert", "eager")
    args, kwargs = _bert_inputs()
    return model, attnopt.compile(
        model, args, kwargs, passes=pipeline, calibration=[(args, kwargs)]
    )


def _replay(model, plan: Plan, pipeline: str = PRUNE, inputs=None):
    """Capture and run ``pipeline`` replaying ``plan`` with an executor that must not be called."""
    args, kwargs = inputs or _bert_inputs()
    graph = attnopt.capture(model, args, kwargs)
    ctx = attnopt.PassContext(
        replay=plan, plan=Plan(plan.model, plan.pipeline), executor=_no_executor
    )
    attnopt.PassManager.parse(pipeline).run(graph, ctx)
    graph.dead_code_elimination()
    return graph, ctx


def _edited(plan: Plan, edit) -> Plan:
    data = json.loads(plan.to_json())
    edit(data)
    return Plan.from_json(json.dumps(data))


def test_head_prune_records_kept_heads_per_module_path():
    _, cm = _recorded()
    plan = cm.plan
    assert plan.model == "BertModel"
    assert plan.pipeline == str(attnopt.PassManager.parse(PRUNE)) == FUSE + "head-prune"
    keys = [site.key for site in plan.sites]
    assert [site.layer for site in plan.sites] == [0, 1]
    assert all(f"layer.{layer}." in key for layer, key in zip((0, 1), keys))
    [(position, text)] = list(plan.decisions)
    assert (position, text) == (2, "head-prune")  # keep=0.5 is the default
    kept = {key: d["heads_kept"] for key, d in plan.decisions[(position, text)].items()}
    assert set(kept) == set(keys) and all(len(heads) == 2 for heads in kept.values())
    assert [s.heads_kept for s in cm.sites] == [2, 2]
    assert Plan.from_json(plan.to_json()) == plan


def test_replay_runs_no_graph_and_rebuilds_the_same_graph():
    model, cm = _recorded()
    graph, ctx = _replay(model, cm.plan)
    attrs = [node.attrs for node in graph.find("attention")]
    assert attrs == [node.attrs for node in cm.graph.find("attention")]
    pruned = sorted(name for name in cm.graph.tensors if name.endswith(".pruned"))
    assert pruned and pruned == sorted(n for n in graph.tensors if n.endswith(".pruned"))
    for name in pruned:
        assert torch.equal(graph.tensors[name], cm.graph.tensors[name])
    assert ctx.plan == cm.plan  # the replay records exactly the decisions it applied


def test_linearize_selection_is_replayed():
    model = zoo_model("minilm", "eager")
    args, kwargs = zoo.get("minilm").example(2, 16)
    pipeline = FUSE + "linearize{count=2}"
    cm = attnopt.compile(model, args, kwargs, passes=pipeline, calibration=[(args, kwargs)])
    [decisions] = cm.plan.decisions.values()
    linear = sorted(cm.plan.site(key).index for key, d in decisions.items() if d["linearized"])
    assert len(linear) == 2 and len(decisions) == 6
    graph, _ = _replay(model, cm.plan, pipeline, inputs=zoo.get("minilm").example(3, 9))
    variants = {n.attrs.site: n.attrs.variant for n in graph.find("attention")}
    assert sorted(i for i, v in variants.items() if v == "linear") == linear


class Attn(nn.Module):
    """Plain attention with a key-padding mask."""

    def forward(self, q, k, v, keep):
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        return torch.softmax(scores, -1) @ v


def _qkv(length: int, batch: int = 2):
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(batch, 2, length, 8, generator=g) for _ in range(3))
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[1, -3:] = False
    return q, k, v, keep


def test_static_block_pattern_is_rebuilt_from_stored_scores():
    inputs = _qkv(48)
    cm = attnopt.compile(Attn(), inputs, calibration=[(inputs, {})], passes=STATIC)
    [decisions] = cm.plan.decisions.values()
    [decision] = decisions.values()
    assert (decision["q_len"], decision["kv_len"]) == (48, 48)
    assert torch.tensor(decision["block_scores"]).shape == (2, 6, 6)
    graph, _ = _replay(Attn(), cm.plan, STATIC, inputs=(inputs, {}))
    for name in ("block_sparse.site0.kv_counts", "block_sparse.site0.kv_indices"):
        assert torch.equal(graph.tensors[name], cm.graph.tensors[name])


@pytest.mark.parametrize("length, variant", [(44, "block_sparse"), (32, "dense")])
def test_static_block_pattern_at_other_lengths(length, variant):
    """Same block grid (44 tokens: 6x6 blocks of 8): the pattern is rebuilt; another grid (32
    tokens: 4x4): the site stays dense, with a note, and computes exact attention."""
    inputs = _qkv(48)
    cm = attnopt.compile(Attn(), inputs, calibration=[(inputs, {})], passes=STATIC)
    other = _qkv(length)
    graph, ctx = _replay(Attn(), cm.plan, STATIC, inputs=(other, {}))
    assert graph.find("attention")[0].attrs.variant == variant
    notes = " ".join(n for record in ctx.history for n in record["notes"])
    assert ("stays dense" in notes) == (variant == "dense")
    out = cm(*other)
    assert torch.allclose(out, Attn()(*other), atol=1e-5) == (variant == "dense")


# ----------------------------------------------------------------------------------------------
# Plans that do not fit: PlanError naming the mismatch, nothing half-applied
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "invalid JSON"),
        (None, "invalid JSON"),  # the recorded plan, truncated
        ('{"format": "other"}', "not an attnopt plan"),
        ("[1, 2]", "not an attnopt plan"),
    ],
)
def test_corrupt_truncated_or_foreign_files(tmp_path, text, match):
    _, cm = _recorded()
    if text is None:
        full = cm.plan.to_json()
        text = full[: len(full) // 2]
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(attnopt.PlanError, match=match):
        attnopt.Plan.load(path)


def test_missing_file_and_newer_version(tmp_path):
    with pytest.raises(attnopt.PlanError, match="cannot read plan"):
        attnopt.Plan.load(tmp_path / "absent.json")
    _, cm = _recorded()
    with pytest.raises(attnopt.PlanError, match="version 2 is newer"):
        _edited(cm.plan, lambda data: data.update(version=2))


def test_other_architecture():
    _, cm = _recorded()
    gpt2 = zoo_model("gpt2", "eager")
    args, kwargs = zoo.get("gpt2").example(2, 12)
    with pytest.raises(attnopt.PlanError, match="made for a BertModel, not a GPT2LMHeadModel"):
        attnopt.compile(gpt2, args, kwargs, plan=cm.plan)


def _bert_variant(**changes) -> nn.Module:
    config = copy.deepcopy(zoo_model("bert", "eager").config)
    for name, value in changes.items():
        setattr(config, name, value)
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).eval()


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"num_hidden_layers": 3}, "2 attention sites .* this model has 3"),
        ({"num_attention_heads": 2}, "num_heads=4, this model has 2"),
    ],
)
def test_other_layer_or_head_count(changes, match):
    _, cm = _recorded()
    model = _bert_variant(**changes)
    args, kwargs = _bert_inputs()
    compiled = attnopt.compile(model, passes=PRUNE, plan=cm.plan)
    with pytest.raises(attnopt.PlanError, match=match):
        compiled(*args, **kwargs)
    assert compiled.stats["compilations"] == 0


def test_missing_site_decision_fails_before_any_slicing():
    model, cm = _recorded()
    first = cm.plan.sites[0].key

    def drop(data):
        del data["decisions"][0]["sites"][first]

    plan = _edited(cm.plan, drop)
    args, kwargs = _bert_inputs()
    graph = attnopt.capture(model, args, kwargs)
    ctx = attnopt.PassContext(replay=plan, executor=_no_executor)
    with pytest.raises(attnopt.PlanError, match=f"no head-prune.* decision for site '{first}'"):
        attnopt.PassManager.parse(PRUNE).run(graph, ctx)
    assert not [name for name in graph.tensors if name.endswith(".pruned")]


def test_site_not_in_the_model():
    _, cm = _recorded()
    old = cm.plan.sites[1].key

    def rename(data):
        data["sites"][1]["key"] = "decoder.block.9.attention"
        block = data["decisions"][0]["sites"]
        block["decoder.block.9.attention"] = block.pop(old)

    plan = _edited(cm.plan, rename)
    model = zoo_model("bert", "eager")
    args, kwargs = _bert_inputs()
    with pytest.raises(attnopt.PlanError, match="site 'decoder.block.9.attention'.* not in"):
        attnopt.compile(model, args, kwargs, plan=plan)


def test_other_pipeline():
    _, cm = _recorded()
    model = zoo_model("bert", "eager")
    args, kwargs = _bert_inputs()
    with pytest.raises(attnopt.PlanError, match="made with passes"):
        attnopt.compile(model, args, kwargs, passes=FUSE + "head-prune{keep=0.75}", plan=cm.plan)


@pytest.mark.parametrize("heads", [[0, 9], [1, 0], [0, 0], "all"])
def test_impossible_heads_kept(heads):
    _, cm = _recorded()
    key = cm.plan.sites[1].key

    def edit(data):
        data["decisions"][0]["sites"][key]["heads_kept"] = heads

    model = zoo_model("bert", "eager")
    args, kwargs = _bert_inputs()
    with pytest.raises(attnopt.PlanError, match="not whole groups"):
        attnopt.compile(model, args, kwargs, plan=_edited(cm.plan, edit))
