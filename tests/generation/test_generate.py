"""cm.generate: the same tokens as model.generate for every decoder, greedy and sampled, batch 1
and left-padded batches; programs compiled once; the cache grown in place; typed errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnopt
from attnopt.errors import GenerationError
from attnopt.zoo.decoders import DECODERS, EOS, build_decoder, left_padded

NEW = 12


@pytest.fixture(scope="module", params=sorted(DECODERS))
def compiled(request):
    model = build_decoder(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = attnopt.compile(model)
    return request.param, model, cm


def _reference(model, ids, mask=None, **options):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **options)


def test_greedy_batch_one_equals_model_generate(compiled):
    name, model, cm = compiled
    ids, _ = left_padded([11], seed=1)
    out = cm.generate(ids, max_new_tokens=NEW)
    assert torch.equal(out, _reference(model, ids, do_sample=False)), name
    assert cm.generation_stats.prompt_tokens == 11


def test_greedy_left_padded_batch_equals_model_generate(compiled):
    name, model, cm = compiled
    ids, mask = left_padded([9, 4, 6], seed=2)
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(out, _reference(model, ids, mask, do_sample=False)), name


def test_sampling_follows_the_same_rules(compiled):
    name, model, cm = compiled
    ids, mask = left_padded([7, 5], seed=3)
    options = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9}
    torch.manual_seed(11)
    ours = cm.generate(ids, attention_mask=mask, max_new_tokens=NEW, **options)
    torch.manual_seed(11)
    theirs = _reference(model, ids, mask, **options)
    assert torch.equal(ours, theirs), name
    seeded = [
        cm.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            generator=torch.Generator().manual_seed(5),
            **options,
        )
        for _ in range(2)
    ]
    assert torch.equal(seeded[0], seeded[1])


def test_programs_compile_once_and_grow_the_cache_in_place(compiled):
    name, model, cm = compiled
    for lengths in ([5], [8, 3], [12, 12, 2, 7]):
        ids, mask = left_padded(lengths, seed=len(lengths))
        cm.generate(ids, attention_mask=mask, max_new_tokens=4)
    generator = cm._generator
    assert generator.prefill.stats["compilations"] <= 2, name  # symbolic + its per-shape check
    assert generator.decode.stats["compilations"] <= 2, name
    assert generator.decode.stats["mode"] == "symbolic"
    counts = generator.decode.graph.op_counts()
    layers = model.config.num_hidden_layers
    assert counts.get("kv_append") == 2 * layers, counts
    assert "kv_append" not in generator.prefill.graph.op_counts()


def test_stops_at_eos_and_pads_finished_rows():
    model = build_decoder("llama")
    cm = attnopt.compile(model)
    ids, mask = left_padded([6, 6], seed=4)
    free = _reference(model, ids, mask, do_sample=False)
    first = int(free[0, 6])
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=first)
    ref = _reference(model, ids, mask, do_sample=False, eos_token_id=first)
    assert torch.equal(out, ref)
    assert int(out[0, 6]) == first and bool((out[0, 7:] == model.config.pad_token_id).all())


def test_bad_requests_get_typed_errors():
    model = build_decoder("gpt2")
    cm = attnopt.compile(model)
    ids, _ = left_padded([10])
    with pytest.raises(GenerationError, match="max_cache_len"):
        cm.generate(ids, max_new_tokens=20, max_cache_len=16)
    with pytest.raises(GenerationError, match="learned positions"):
        cm.generate(ids, max_new_tokens=300)
    with pytest.raises(GenerationError, match="num_beams"):
        cm.generate(ids, max_new_tokens=4, num_beams=2)
    with pytest.raises(GenerationError, match="does not take"):
        cm.generate(ids, max_new_tokens=4, no_such_option=1)
    with pytest.raises(GenerationError, match="static cache"):
        cm.generate(ids, max_new_tokens=4, past_key_values=object())
    with pytest.raises(GenerationError, match="integer"):
        cm.generate(ids.float(), max_new_tokens=4)
    with pytest.raises(GenerationError, match="greater than 0"):
        cm.generate(ids, max_new_tokens=0)
    mistral = attnopt.compile(build_decoder("mistral"))
    with pytest.raises(GenerationError, match="sliding window of 128"):
        mistral.generate(ids, max_new_tokens=200)


def test_models_without_an_lm_head_are_refused():
    from attnopt import zoo

    bert = zoo.get("bert").build("sdpa").eval()
    with pytest.raises(GenerationError, match="causal LM head"):
        attnopt.compile(bert).generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)
    t5 = zoo.get("t5").build("sdpa").eval()
    with pytest.raises(GenerationError, match="encoder-decoder"):
        attnopt.compile(t5).generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)


def test_eos_constant_is_outside_prompts():
    ids, _ = left_padded([50], seed=0)
    assert not bool((ids == EOS).any())


WINDOWED = "canonicalize,fuse-attention,sliding-window{window=6,sinks=2}"


def _windowed_reference(compiled, ids, mask, new):
    """Greedy decoding by recomputing the whole sequence through the windowed model."""
    tokens = ids
    with torch.no_grad():
        for _ in range(new):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            out = compiled(input_ids=tokens, attention_mask=mask, position_ids=positions)
            chosen = out.logits[:, -1].argmax(-1)
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return tokens


@pytest.mark.parametrize("lengths", [[5], [7, 4], [12, 3]])
def test_streaming_cache_keeps_sinks_and_window_and_matches_the_windowed_model(lengths):
    model = build_decoder("llama")
    generating = attnopt.compile(model, passes=WINDOWED)
    reference = attnopt.compile(model, passes=WINDOWED)
    ids, mask = left_padded(lengths, seed=7)
    out = generating.generate(ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(out, _windowed_reference(reference, ids, mask, 20))
    assert generating.generation_stats.cache_capacity == 2 + 6 + 1  # sinks + window + new
    assert {site.variant for site in reference.sites} == {"sliding_window"}
    assert generating._generator.decode.stats["compilations"] == 1


def test_a_partial_sliding_window_applies_to_the_prompt_only_and_says_so():
    model = build_decoder("llama")
    cm = attnopt.compile(
        model, passes="canonicalize,fuse-attention,sliding-window{window=6,layers=[1]}"
    )
    ids, mask = left_padded([5])
    with pytest.warns(UserWarning, match="prompt pass .* only"):
        cm.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert cm.generation_stats.cache_capacity == 17  # every position kept


def test_example_runs_and_does_what_it_says():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main()
    assert result == {"same_tokens": True, "streamed": 64, "cache_capacity": 21}


def test_text_generation_pipeline_runs_the_compiled_decoder():
    """A real client: transformers' text-generation pipeline with the compiled module as its
    model gives the original model's text (greedy), for a batch of prompts of varying length."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, pipeline

    from attnopt.zoo.minilm import minilm_dir

    # A tokenizer of our own: the zoo's shared one must keep its right padding for other tests.
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    prompts = ["attention is all you need", "a compiler", "tokens in, tokens out, faster now"]
    options = {"max_new_tokens": 10, "do_sample": False, "batch_size": 3}
    expected = pipeline("text-generation", model=model, tokenizer=tokenizer)(prompts, **options)
    cm = attnopt.compile(model)
    got = pipeline("text-generation", model=cm, tokenizer=tokenizer)(prompts, **options)
    assert got == expected
    assert cm.generation_stats is not None and cm.generation_stats.new_tokens == 10
