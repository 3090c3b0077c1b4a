"""attnopt under real clients nobody here wrote, over the real all-MiniLM-L6-v2: the compiled
module as a drop-in inside sentence-transformers' ``encode()`` and HF's feature-extraction
pipeline, and ``torch.compile(model, backend="attnopt")``, each at varying batch sizes and padded
lengths. Results must match the original model's; the compiled module must really have run.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import attnopt
from attnopt.dynamo import make_backend
from attnopt.tolerances import EXACT, ORACLE_ERROR_RATIO
from attnopt.zoo.texts import varied_texts
from tests import zoo

# Normalised fp32 sentence embeddings of the compiled model against the original's.
MIN_COSINE = 0.99999
MAX_ABS_DIFF = EXACT[torch.float32].atol


@pytest.fixture(scope="module")
def st() -> Any:
    """The packaged MiniLM as a SentenceTransformer (HF sdpa attention), built once."""
    return zoo.minilm_sentence_transformer("sdpa")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """16 texts of real sentences, 5 to 96 MiniLM tokens long."""
    return varied_texts(zoo.minilm_tokenizer(), 16, 5, 96, seed=1)


def tokens(st, texts: list[str]) -> dict[str, torch.Tensor]:
    """A padded batch of model inputs for ``texts`` (the example to compile on)."""
    return dict(st.tokenizer(texts, padding=True, return_tensors="pt"))


def record_calls(cm: Any) -> list[tuple[int, ...]]:
    """The ``input_ids`` shapes ``cm`` is called with, recorded on its ``forward`` (which
    sentence-transformers 6 calls directly, so module hooks never see those calls)."""
    calls: list[tuple[int, ...]] = []
    forward = cm.forward

    def recording_forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    cm.forward = recording_forward
    return calls


@contextlib.contextmanager
def drop_in(st, example: dict[str, torch.Tensor]) -> Iterator[tuple[Any, list]]:
    """Compile ``st``'s inner HF model on ``example`` and put it in its place (``st[0].model``
    in sentence-transformers 6, as users do); yield the compiled module and the list of the
    ``input_ids`` shapes it is called with; restore the original model afterwards."""
    original = st[0].model
    cm = attnopt.compile(original, kwargs=example)
    calls = record_calls(cm)
    st[0].model = cm
    try:
        yield cm, calls
    finally:
        st[0].model = original


def assert_embeddings_match(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Row-wise cosine and element-wise difference of two embedding matrices."""
    assert actual.shape == expected.shape
    cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
    assert float(cosine.min()) > MIN_COSINE, f"min cosine {float(cosine.min())}"
    assert float((actual - expected).abs().max()) <= MAX_ABS_DIFF


def encode(st, texts: list[str], batch_size: int) -> torch.Tensor:
    return st.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)


def test_sentence_transformers_encode_through_compiled_module(st, texts):
    """``encode()`` at several batch sizes (so many padded lengths), one text per batch (no
    padding at all) and a batch of one text repeated, through one compiled module."""
    runs = [(texts, 3), (texts, 8), (texts, 16), (texts[:4], 1), ([texts[5]] * 5, 5)]
    expected = [encode(st, inputs, bs) for inputs, bs in runs]
    with drop_in(st, tokens(st, texts[:8])) as (cm, calls):
        actual = [encode(st, inputs, bs) for inputs, bs in runs]
    for got, want in zip(actual, expected):
        assert_embeddings_match(got, want)
    # Every batch of every encode() ran through the compiled module, at many shapes.
    chunks = [min(bs, len(inputs) - i) for inputs, bs in runs for i in range(0, len(inputs), bs)]
    assert sorted(batch for batch, _ in calls) == sorted(chunks)
    assert len(set(calls)) >= 8
    assert cm.stats["compilations"] >= 1
    # And the module that ran is the compiled one, not a silent fallback to the model.
    assert len(cm.sites) == zoo.get("minilm").sites


def test_stats_report_captures_and_specialisations(st, texts, capsys):
    """``cm.stats`` after encoding batches of different padded lengths. The counts themselves are
    printed, not asserted (how many captures a new shape costs is the driver's business); the
    results are."""
    example = tokens(st, texts[:4])
    lengths = {int(n) for n in tokens(st, texts)["attention_mask"].sum(1)}
    expected = encode(st, texts, 4)
    with drop_in(st, example) as (cm, calls):
        after_compile = copy.deepcopy(cm.stats)
        actual = encode(st, texts, 4)
        again = encode(st, texts, 4)
    with capsys.disabled():
        print(f"\ncm.stats after compile: {after_compile}")
        print(
            f"cm.stats after 2 x {len(calls) // 2} batches ({len(set(calls))} shapes): {cm.stats}"
        )
    assert_embeddings_match(actual, expected)
    assert torch.equal(actual, again)
    assert len(set(calls)) >= 4 and len(lengths) >= 4
    for key in ("compilations", "cache_hits"):
        assert isinstance(cm.stats[key], int), key
    assert cm.stats["compilations"] >= 1
    # The second encode() met only shapes the first had already seen.
    assert cm.stats["cache_hits"] >= 1


def assert_exact_vs_fp64(actual: torch.Tensor, expected: torch.Tensor, oracle: torch.Tensor):
    """Within the fp32 exact tolerance of ``expected``, or (the fp64-oracle rule of
    ``attnopt.validate``) no further from the float64 ``oracle`` than
    ``ORACLE_ERROR_RATIO`` times ``expected`` is, in RMSE."""
    tol = EXACT[torch.float32]
    if torch.allclose(actual, expected, atol=tol.atol, rtol=tol.rtol):
        return
    error = float((actual.double() - oracle).pow(2).mean().sqrt())
    eager_error = float((expected.double() - oracle).pow(2).mean().sqrt())
    assert error <= max(tol.atol, ORACLE_ERROR_RATIO * eager_error), (error, eager_error)


def test_hf_feature_extraction_pipeline_accepts_compiled_module(texts):
    from transformers import pipeline

    model = zoo.get("minilm").build("sdpa")
    tokenizer = zoo.minilm_tokenizer()
    cm = attnopt.compile(
        model, kwargs=dict(tokenizer(texts[:4], padding=True, return_tensors="pt"))
    )
    calls = record_calls(cm)
    inputs = texts[:4]

    def features(module: torch.nn.Module, batch_size: int) -> list[torch.Tensor]:
        extract = pipeline("feature-extraction", model=module, tokenizer=tokenizer, device="cpu")
        return [torch.tensor(item) for item in extract(inputs, batch_size=batch_size)]

    for batch_size in (1, 2):
        expected = features(model, batch_size)
        oracle = features(copy.deepcopy(model).double(), batch_size)
        actual = features(cm, batch_size)
        assert len(actual) == len(expected) == len(inputs)
        for got, want, want64 in zip(actual, expected, oracle):
            assert got.shape == want.shape
            assert_exact_vs_fp64(got, want, want64)
    assert len(calls) == len(inputs) + 2
    assert len(set(calls)) >= 4


def _minilm_batches(texts: list[str]) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of three batch sizes and padded lengths."""
    tokenizer = zoo.minilm_tokenizer()
    groups = (texts[:2], texts[2:5], texts[5:6])
    return [dict(tokenizer(group, padding=True, return_tensors="pt")) for group in groups]


@pytest.mark.parametrize("dynamic", [None, True])
def test_torch_compile_attnopt_backend_on_varying_shapes(texts, dynamic):
    """``torch.compile(model, backend="attnopt")`` (here through :func:`make_backend`, the same
    backend with a spy; the name itself is tested in test_dynamo.py) on three shapes."""
    torch._dynamo.reset()
    model = zoo.get("minilm").build("sdpa")
    inner = make_backend()
    built = []

    def backend(gm, example_inputs):
        fn = inner(gm, example_inputs)
        built.append(getattr(fn, "attnopt_module", None))
        return fn

    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    batches = _minilm_batches(texts)
    assert len({tuple(b["input_ids"].shape) for b in batches}) == len(batches)
    tol = EXACT[torch.float32]
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(
                compiled(**batch).last_hidden_state,
                model(**batch).last_hidden_state,
                atol=tol.atol,
                rtol=tol.rtol,
            )
    used = sum(module is not None for module in built)
    print(f"\ndynamic={dynamic}: {len(built)} Dynamo graphs, {used} compiled by attnopt")
    assert built
    if dynamic is None:
        # The first graph has static shapes: attnopt compiles it.
        assert built[0] is not None and len(built[0].sites) == zoo.get("minilm").sites
