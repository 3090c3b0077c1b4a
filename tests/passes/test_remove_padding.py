"""remove-padding: token-wise work on the real tokens only, attention per sequence.

Outputs at real positions equal the model's (exact tolerance); padded positions are zeros.
"""

import warnings

import pytest
import torch

import attnopt
from attnopt import zoo
from attnopt.zoo import primary_output

PIPELINE = "canonicalize,fuse-attention,remove-padding"


def _left_padded(kwargs):
    """The same rows with their padding moved to the left."""
    out = dict(kwargs)
    mask = kwargs["attention_mask"]
    lengths = mask.sum(1)
    for name, tensor in kwargs.items():
        if isinstance(tensor, torch.Tensor) and tensor.shape == mask.shape:
            rows = [
                torch.roll(tensor[i], int(mask.shape[1] - lengths[i])) for i in range(len(mask))
            ]
            out[name] = torch.stack(rows)
    return out


def _check(model, cm, args, kwargs):
    with torch.no_grad():
        expected = primary_output(model(*args, **kwargs))
        got = primary_output(cm(*args, **kwargs))
    real = kwargs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)
    assert got[~real].abs().max() == 0 if (~real).any() else True


def _packed_sites(cm):
    return [s for s in cm.sites if s.kind == "self" and not isinstance(s.q_len, int)]


@pytest.mark.parametrize("name", ["bert", "minilm", "llama"])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_real_positions_match_and_padding_is_zero(name, left):
    entry = zoo.get(name)
    model = entry.build("sdpa")
    args, kwargs = entry.example(3, 12)
    if left:
        kwargs = _left_padded(kwargs)
    cm = attnopt.compile(model, args, kwargs, passes=PIPELINE, strict=True)
    history = [r for r in cm.history if r["pass"] == "remove-padding"][0]
    assert history["changed"], history["notes"]
    assert "token_index" in str(cm.graph) and "pack(" in str(cm.graph)
    _check(model, cm, args, kwargs)
    # other batch sizes and lengths run the same (symbolic) program
    for batch, seq in ((2, 9), (5, 17)):
        a, k = entry.example(batch, seq)
        _check(model, cm, a, _left_padded(k) if left else k)
    assert cm.stats["mode"] == "symbolic"


def test_linear_layers_run_on_real_tokens_only():
    entry = zoo.get("minilm")
    model = entry.build("sdpa")
    args, kwargs = entry.example(4, 16)
    cm = attnopt.compile(model, args, kwargs, passes=PIPELINE)
    seen = []
    linear = cm.compile_for(args, kwargs).kernels.linear

    def spy(x, *rest):
        seen.append(x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1])
        return linear(x, *rest)

    cm.compile_for(args, kwargs).kernels.linear = spy
    with torch.no_grad():
        cm(*args, **kwargs)
    mask = kwargs["attention_mask"]
    real = int(mask.sum())
    assert real < mask.numel()
    # 6 layers x 6 projections on the real tokens; the pooler reads one token per row
    assert seen.count(real) == 36 and seen.count(mask.shape[0]) == 1 and len(seen) == 37


def test_sites_it_cannot_serve_are_declined_with_the_reason():
    entry = zoo.get("t5")
    model = entry.build("eager")
    args, kwargs = entry.example(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = attnopt.compile(model, args, kwargs, passes=PIPELINE)
    told = [str(w.message) for w in caught if "left attention sites" in str(w.message)]
    assert told and "remove-padding" in told[0]
    with torch.no_grad():
        torch.testing.assert_close(
            primary_output(cm(*args, **kwargs)), primary_output(model(*args, **kwargs))
        )


def test_no_padding_mask_means_no_change():
    entry = zoo.get("vit")
    model = entry.build("sdpa")
    args, kwargs = entry.example(2, 8)
    cm = attnopt.compile(model, args, kwargs, passes=PIPELINE)
    assert "token_index" not in str(cm.graph)
    with torch.no_grad():
        torch.testing.assert_close(
            primary_output(cm(*args, **kwargs)), primary_output(model(*args, **kwargs))
        )


def test_sentence_transformers_embeddings_match():
    st = zoo.minilm_sentence_transformer("sdpa")
    texts = [
        "A short one.",
        "Padding removal packs the real tokens of a batch and runs attention per sentence.",
        "Mid-length sentence about compilers.",
    ]
    expected = st.encode(texts, batch_size=3, convert_to_tensor=True)
    st[0].model = attnopt.compile(st[0].model, passes=PIPELINE)
    got = st.encode(texts, batch_size=3, convert_to_tensor=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_validate_compares_real_positions_only_and_says_so():
    entry = zoo.get("minilm")
    model = entry.build("sdpa")
    args, kwargs = entry.example(3, 12)
    cm = attnopt.compile(model, args, kwargs, passes=PIPELINE)
    assert cm.removed_padding == "attention_mask"
    report = attnopt.validate(model, cm, args, kwargs)
    assert report.ok, str(report)
    assert any("real positions only" in w for w in report.warnings)
    # without padding removal nothing is masked out of the comparison
    exact = attnopt.compile(model, args, kwargs, passes="canonicalize,fuse-attention")
    assert exact.removed_padding is None
    assert not any(
        "real positions" in w for w in attnopt.validate(model, exact, args, kwargs).warnings
    )
