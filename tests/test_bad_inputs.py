"""The bad-input matrix (issue #18): every bad input gets its typed error or the correct result.

Each case checks three things: the outcome (an :mod:`attnopt.errors` type, or eager's result,
NaN pattern included), that nothing is corrupted (the model's parameters are unchanged and the
compiled module still runs good inputs), and that an error message names the input and what to
do. Cases where attnopt does not do this yet are ``xfail(strict=True)`` with the fix they need.

Models are tiny: ``nn.MultiheadAttention`` + a linear (``mha``), a 2-layer BERT from a config, and
small models defined here. The kernel-cache cases run the generated Triton kernels in Triton's
interpreter (``backend="triton-interpret"``; tests/conftest.py sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import queue
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import attnopt
from attnopt.errors import (
    BackendError,
    CalibrationError,
    CaptureError,
    PassError,
    PipelineError,
    PlanError,
    SignatureError,
)
from attnopt.runtime.triton.cache import KernelCache
from attnopt.runtime.triton.loader import triton_interpreter_ready
from attnopt.tolerances import assert_close
from tests import zoo

# --------------------------------------------------------------------------------------------
# models, inputs and checks


def _mha() -> nn.Module:
    return zoo.get("mha").build(None)


def _mha_input(batch: int = 2, seq: int = 8) -> torch.Tensor:
    (hidden,), _ = zoo.get("mha").example(batch, seq)
    return hidden


def _bert(layers: int = 2) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=zoo.VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).eval()


def _bert_inputs(batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    return zoo.get("bert").example(batch, seq)[1]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _eager(model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return zoo.primary_output(model(*args, **kwargs))


def _assert_same_as_eager(model: nn.Module, compiled: Any, *args: Any, **kwargs: Any) -> None:
    expected = _eager(model, *args, **kwargs)
    actual = zoo.primary_output(compiled(*args, **kwargs))
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN pattern differs from eager's"
    assert_close(actual, expected)


def _assert_unharmed(
    model: nn.Module, snapshot: dict[str, torch.Tensor], compiled: Any, *args: Any, **kwargs: Any
) -> None:
    """The model's parameters and buffers are as they were, and the compiled module (when there
    is one) still runs a good input like eager."""
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for name, value in snapshot.items():
        same = torch.equal(state[name], value) or (
            value.is_floating_point()
            and torch.equal(state[name].isnan(), value.isnan())
            and torch.equal(state[name].nan_to_num(), value.nan_to_num())
        )
        assert same, f"{name} was changed"
    if compiled is not None:
        _assert_same_as_eager(model, compiled, *args, **kwargs)


class MessageLacks(AssertionError):
    """An error message that does not name the input or the fix (what the xfails below expect,
    so that any other failed assertion still fails them)."""


def _assert_names(message: str, *patterns: str) -> None:
    for pattern in patterns:
        if not re.search(pattern, message):
            raise MessageLacks(f"message lacks {pattern!r}:\n{message}")


@pytest.fixture(scope="module")
def bert() -> tuple[nn.Module, Any, dict[str, torch.Tensor]]:
    """A 2-layer BERT compiled once (every BERT case calls the same compiled module)."""
    model = _bert()
    snapshot = _snapshot(model)
    compiled = attnopt.compile(model, (), _bert_inputs())
    return model, compiled, snapshot


# --------------------------------------------------------------------------------------------
# inputs of a compiled module


def _mha_call(case: str, hidden: torch.Tensor) -> Callable[[Any], Any]:
    calls: dict[str, Callable[[Any], Any]] = {
        "float64": lambda cm: cm(hidden.double()),
        "rank-4": lambda cm: cm(hidden[None]),
        "feature-size": lambda cm: cm(hidden[..., :16]),
        "meta-device": lambda cm: cm(hidden.to("meta")),
        "extra-keyword": lambda cm: cm(hidden, bogus=hidden),
        "missing-input": lambda cm: cm(),
        "extra-positional": lambda cm: cm(hidden, hidden),
    }
    return calls[case]


@pytest.mark.parametrize(
    ("case", "patterns"),
    [
        ("float64", [r"\bx\b", r"float64|double", r"float32"]),
        ("rank-4", [r"\bx\b", r"4-D"]),
        ("feature-size", [r"\bx\b", r"32"]),
        ("meta-device", [r"'x'", r"meta", r"cpu", r"\.to\("]),
        ("extra-keyword", [r"'bogus'", r"unexpected keyword"]),
        ("missing-input", [r"'x'", r"missing"]),
        ("extra-positional", [r"too many positional"]),
    ],
)
def test_bad_call_raises_signature_error(case: str, patterns: list[str]) -> None:
    model = _mha()
    snapshot = _snapshot(model)
    hidden = _mha_input()
    compiled = attnopt.compile(model, (hidden,))
    with pytest.raises(SignatureError) as caught:
        _mha_call(case, hidden)(compiled)
    _assert_unharmed(model, snapshot, compiled, _mha_input(3, 5))
    _assert_names(str(caught.value), *patterns)


def test_meta_example_raises_capture_error() -> None:
    """An example on the meta device (no data) is refused before anything is compiled."""
    model = _mha()
    snapshot = _snapshot(model)
    with pytest.raises(CaptureError) as caught:
        attnopt.compile(model, (_mha_input().to("meta"),))
    _assert_names(str(caught.value), r"'x'", r"meta", r"\.to\(")
    _assert_unharmed(model, snapshot, attnopt.compile(model, (_mha_input(),)), _mha_input())


_EAGER = "eager's result"


@pytest.mark.parametrize(
    ("case", "outcome"),
    [
        ("int32-ids", _EAGER),
        ("no-mask", _EAGER),
        ("batch-1", _EAGER),
        ("float-ids", [r"'?input_ids'?", r"float32", r"int64"]),
        ("zero-batch", [r"'?input_ids'?", r"\b0\b|empty"]),
        ("zero-length", [r"'?input_ids'?", r"\b0\b|empty"]),
        ("meta", [r"'input_ids'", r"meta", r"\.to\("]),
    ],
)
def test_bert_inputs(case: str, outcome: Any, bert: tuple) -> None:
    """Inputs eager BERT runs give eager's result; those it cannot run (eager raises too) a
    SignatureError naming the input."""
    model, compiled, snapshot = bert
    inputs = _bert_inputs()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    kwargs = {
        "int32-ids": {"input_ids": ids.int(), "attention_mask": mask},
        "no-mask": {"input_ids": ids},
        "batch-1": {"input_ids": ids[:1], "attention_mask": mask[:1]},
        "float-ids": {"input_ids": ids.float(), "attention_mask": mask},
        "zero-batch": {"input_ids": ids[:0], "attention_mask": mask[:0]},
        "zero-length": {"input_ids": ids[:, :0], "attention_mask": mask[:, :0]},
        "meta": {"input_ids": ids.to("meta"), "attention_mask": mask.to("meta")},
    }[case]
    if outcome == _EAGER:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a new call structure may compile per shape
            _assert_same_as_eager(model, compiled, **kwargs)
        _assert_unharmed(model, snapshot, compiled, **_bert_inputs(3, 6))
        return
    with pytest.raises(Exception):  # noqa: B017, PT011 - eager fails on it: no result to match
        _eager(model, **kwargs)
    with pytest.raises(SignatureError) as caught:
        compiled(**kwargs)
    _assert_unharmed(model, snapshot, compiled, **_bert_inputs(3, 6))
    _assert_names(str(caught.value), *outcome)


def test_zero_length_sequence_matches_eager() -> None:
    model = _mha()
    snapshot = _snapshot(model)
    compiled = attnopt.compile(model, (_mha_input(),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same_as_eager(model, compiled, _mha_input(2, 0))
        _assert_same_as_eager(model, compiled, _mha_input(0, 8))
    _assert_unharmed(model, snapshot, compiled, _mha_input(3, 7))


def test_unbatched_input_matches_eager() -> None:
    """nn.MultiheadAttention takes an unbatched [S, E] query too; eager runs it."""
    model = _mha()
    snapshot = _snapshot(model)
    compiled = attnopt.compile(model, (_mha_input(),))
    _assert_same_as_eager(model, compiled, _mha_input(1, 8)[0])
    _assert_unharmed(model, snapshot, compiled, _mha_input(3, 7))


# --------------------------------------------------------------------------------------------
# NaN and inf


def test_nan_and_inf_inputs_give_eagers_nan_pattern() -> None:
    model = _mha()
    snapshot = _snapshot(model)
    compiled = attnopt.compile(model, (_mha_input(),))
    hidden = _mha_input(3, 8)
    hidden[0, 3, 5] = float("nan")
    hidden[1, 2, 1] = float("inf")
    hidden[2, 0, 0] = -float("inf")
    _assert_same_as_eager(model, compiled, hidden)
    _assert_unharmed(model, snapshot, compiled, _mha_input(3, 7))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weight_gives_eagers_nan_pattern(value: float) -> None:
    model = copy.deepcopy(_mha())
    with torch.no_grad():
        model.attn.in_proj_weight[5, 3] = value
    snapshot = _snapshot(model)
    compiled = attnopt.compile(model, (_mha_input(),))
    _assert_same_as_eager(model, compiled, _mha_input())
    _assert_unharmed(model, snapshot, compiled, _mha_input(3, 7))


# --------------------------------------------------------------------------------------------
# models that are not plain inference graphs


class _CountingAttention(nn.Module):
    """Self-attention whose forward counts its calls in a buffer and scales by the count."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 48)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        out = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
        return out.transpose(1, 2).reshape(x.shape) * self.calls


def test_model_that_mutates_its_state() -> None:
    """Every call counts, as in eager: the compiled module updates the buffer (and its output
    follows it), or compile refuses naming the buffer; it never runs with a stale copy."""
    torch.manual_seed(0)
    model = _CountingAttention().eval()
    twin = copy.deepcopy(model)
    hidden = torch.randn(2, 5, 16)
    try:
        compiled = attnopt.compile(model, (hidden,))
    except CaptureError as err:
        _assert_names(str(err), r"buffer 'calls'", r"in place", r"outside forward")
        assert float(model.calls) == 0.0
        return
    for _ in range(3):
        twin.calls.copy_(model.calls)
        _assert_same_as_eager(twin, compiled, hidden)  # twin's forward counts one call
        assert float(model.calls) == float(twin.calls)


def test_training_mode_with_dropout_warns() -> None:
    model = copy.deepcopy(zoo.get("encoder_layer").build(None)).train()
    for layer in model.layers:
        layer.dropout.p = layer.dropout1.p = layer.dropout2.p = 0.1
    with pytest.warns(UserWarning, match=r"training mode.*dropout.*model\.eval\(\)"):
        attnopt.compile(model, (_mha_input(),))
    assert model.training


# --------------------------------------------------------------------------------------------
# pass options


@pytest.mark.parametrize(
    ("passes", "patterns"),
    [
        ("sliding-window{window=-3}", [r"window=-3", r"> 0"]),
        ("sliding-window{window=0}", [r"window=0", r"> 0"]),
        ("sliding-window{windw=4}", [r"unknown option 'windw'", r"window"]),
        ("no-such-pass", [r"unknown pass 'no-such-pass'", r"sliding-window"]),
        ("sliding-window{window=abc}", [r"window='abc'", r"int"]),
        ("sliding-window{window=2.5}", [r"window=2.5", r"int"]),
        ("sliding-window{window=true}", [r"window=True", r"int"]),
        ("head-prune{keep=2}", [r"keep=2", r"\(0, 1\]"]),
        ("head-prune{keep=yes}", [r"keep='yes'", r"float"]),
        ("sliding-window{window=4", [r"unbalanced", r"sliding-window\{window=4"]),
    ],
)
def test_bad_pass_options_raise_pipeline_error(passes: str, patterns: list[str]) -> None:
    model = _mha()
    snapshot = _snapshot(model)
    with pytest.raises(PipelineError) as caught:
        attnopt.compile(model, (_mha_input(),), passes=passes)
    _assert_names(str(caught.value), *patterns)
    _assert_unharmed(model, snapshot, None)


@pytest.mark.parametrize(
    ("options", "error"),
    [({"passes": 3}, PipelineError), ({"backend": "cuda"}, BackendError)],
)
def test_bad_compile_options(options: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        attnopt.compile(_mha(), (_mha_input(),), **options)


# --------------------------------------------------------------------------------------------
# calibration and plans

_PRUNE = "canonicalize,fuse-attention,head-prune{keep=0.5}"


@pytest.mark.parametrize(
    "case",
    [
        "missing-input",
        "wrong-length",
        "not-a-pair",
        "not-a-batch",
    ],
)
def test_calibration_that_does_not_fit(case: str) -> None:
    """Calibration data of another structure or shape: a typed error naming the calibration
    data; the model's weights (which head-prune slices copies of) are untouched."""
    model = _bert()
    snapshot = _snapshot(model)
    inputs = _bert_inputs()
    calibration = {
        "missing-input": [((), {"input_ids": inputs["input_ids"]})],
        "wrong-length": [((), {**inputs, "attention_mask": inputs["attention_mask"][:, :5]})],
        "not-a-pair": [inputs["input_ids"]],
        "not-a-batch": [3],
    }[case]
    with pytest.raises((SignatureError, PassError, CalibrationError)) as caught:
        attnopt.compile(model, (), inputs, passes=_PRUNE, calibration=calibration, dynamic=False)
    _assert_names(str(caught.value), r"calibration (inputs|data|batch)", r"structure|shape|fit")
    _assert_unharmed(model, snapshot, None)


@pytest.fixture(scope="module")
def pruned_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A head-prune plan of the 2-layer BERT, saved."""
    inputs = _bert_inputs()
    compiled = attnopt.compile(
        _bert(), (), inputs, passes=_PRUNE, calibration=[((), inputs)], dynamic=False
    )
    return compiled.plan.save(tmp_path_factory.mktemp("plan") / "bert-pruned.json")


def test_plan_for_another_layer_count(pruned_plan: Path) -> None:
    model = _bert(layers=3)
    snapshot = _snapshot(model)
    inputs = _bert_inputs()
    with pytest.raises(PlanError) as caught:
        attnopt.compile(model, (), inputs, plan=pruned_plan)
    _assert_names(str(caught.value), r"2 attention sites", r"this model has 3")
    _assert_unharmed(model, snapshot, None)


@pytest.mark.parametrize("damage", ["truncated", "not-json", "empty", "wrong-types", "newer"])
def test_corrupt_plan_file(damage: str, pruned_plan: Path, tmp_path: Path) -> None:
    text = pruned_plan.read_text()
    data = json.loads(text)
    damaged = {
        "truncated": text[: len(text) // 2],
        "not-json": "\x00\x01 not a plan",
        "empty": "",
        "wrong-types": json.dumps({**data, "decisions": {"a": 1}}),
        "newer": json.dumps({**data, "version": 99}),
    }[damage]
    path = tmp_path / "plan.json"
    path.write_text(damaged)
    with pytest.raises(PlanError) as caught:
        attnopt.compile(_bert(), (), _bert_inputs(), plan=path)
    _assert_names(str(caught.value), re.escape(str(path)) + "|plan")


# --------------------------------------------------------------------------------------------
# the on-disk kernel cache

needs_interpreter = pytest.mark.skipif(
    not triton_interpreter_ready(), reason="triton is missing or imported without TRITON_INTERPRET"
)


def _compile_interpreted(model: nn.Module, hidden: torch.Tensor) -> Any:
    # One compile per shape: these cases are about the kernel cache, not about shapes.
    return attnopt.compile(model, (hidden,), backend="triton-interpret", dynamic=False)


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.py"))


@pytest.fixture
def cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    directory = tmp_path / "kernels"
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(directory))
    return directory


@needs_interpreter
def test_corrupt_cache_entry_is_rebuilt(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model, hidden = _mha(), _mha_input()
    compiled = _compile_interpreted(model, hidden)
    _assert_same_as_eager(model, compiled, hidden)
    assert compiled.kernels, "the site should run a generated kernel"
    (good,) = _entries(cache_dir)
    # The same entries in a fresh directory, with the kernel source tampered with.
    damaged_dir = tmp_path / "damaged"
    damaged_dir.mkdir()
    (damaged_dir / good.name).write_text("raise RuntimeError('tampered kernel')\n")
    (damaged_dir / good.with_suffix(".json").name).write_text(good.with_suffix(".json").read_text())
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(damaged_dir))
    compiled = _compile_interpreted(model, hidden)
    _assert_same_as_eager(model, compiled, hidden)
    assert (damaged_dir / good.name).read_text() == good.read_text()
    assert KernelCache(damaged_dir).lookup(good.stem) == damaged_dir / good.name


def test_cache_key_that_escapes_the_directory(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path / "kernels")
    for key in ["../" + "a" * 61, "../../etc/passwd", "a" * 63 + "/"]:
        with pytest.raises(ValueError, match="invalid kernel cache key"):
            cache.get_or_create(key, "VALUE = 1\n", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cache_entry_symlinked_out_of_the_directory(tmp_path: Path) -> None:
    """An entry whose file is a symlink to a file elsewhere is not loaded from there: it is
    rebuilt as a file of the cache directory, and the file outside is left alone."""
    directory = tmp_path / "kernels"
    cache = KernelCache(directory)
    source = "VALUE = 3\n"
    key = "b" * 64
    cache.get_or_create(key, source, {})
    outside = tmp_path / "outside.py"
    outside.write_text(source)  # same text: the entry's metadata hash matches through the link
    entry = directory / f"{key}.py"
    entry.unlink()
    entry.symlink_to(outside)
    assert cache.lookup(key) is None
    module = cache.load_module(key, source, {})
    assert module.VALUE == 3
    assert not entry.is_symlink() and Path(module.__file__).resolve().parent == directory.resolve()
    assert outside.read_text() == source


def _refuse_writes(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o500)
    probe = directory / ".probe"
    try:
        probe.write_text("")
    except PermissionError:
        return
    probe.unlink()
    directory.chmod(0o700)
    pytest.skip("chmod 0o500 does not stop writes here (running as root): not tested")


@needs_interpreter
@pytest.mark.parametrize("fault", ["read-only", "not-a-directory"])
def test_unwritable_cache_directory(fault: str, cache_dir: Path) -> None:
    """A cache directory that cannot be written: the site runs the torch kernels with one
    warning naming the directory and the variable that moves it (strict=True: a BackendError
    saying the same); never a raw OSError."""
    if fault == "read-only":
        _refuse_writes(cache_dir)
    else:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        cache_dir.write_text("a file where the cache directory should be")
    model, hidden = _mha(), _mha_input()
    snapshot = _snapshot(model)
    try:
        with pytest.warns(RuntimeWarning) as caught:
            compiled = _compile_interpreted(model, hidden)
            _assert_same_as_eager(model, compiled, hidden)
        with pytest.raises(BackendError) as raised:
            attnopt.compile(
                model, (hidden,), backend="triton-interpret", dynamic=False, strict=True
            )(hidden)
    finally:
        if fault == "read-only":
            cache_dir.chmod(0o700)
    told = [str(w.message) for w in caught if "cache directory" in str(w.message)]
    assert len(told) == 1, [str(w.message) for w in caught]
    _assert_names(told[0], re.escape(str(cache_dir)), r"ATTNOPT_CACHE_DIR")
    _assert_names(str(raised.value), re.escape(str(cache_dir)), r"ATTNOPT_CACHE_DIR")
    _assert_unharmed(model, snapshot, attnopt.compile(model, (hidden,)), hidden)


def _compile_in_child(cache_dir: str, barrier: Any, results: Any) -> None:
    """One of two processes that compile the same kernel into one cache directory at once."""
    os.environ["ATTNOPT_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)
    model, hidden = _mha(), _mha_input()
    try:
        barrier.wait(timeout=120)
        compiled = _compile_interpreted(model, hidden)
        _assert_same_as_eager(model, compiled, hidden)
        results.put(("ok", sorted(compiled.kernels)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        results.put(("error", f"{type(err).__name__}: {err}"))


@needs_interpreter
def test_two_processes_compile_the_same_kernel(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    cache_dir = tmp_path / "shared"
    workers = [
        context.Process(target=_compile_in_child, args=(str(cache_dir), barrier, results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outcomes: list[tuple[str, Any]] = []
    while len(outcomes) < len(workers):
        try:
            outcomes.append(results.get(timeout=5))
        except queue.Empty:
            if not any(worker.is_alive() for worker in workers) and results.empty():
                break  # a worker died without reporting
    for worker in workers:
        worker.join(timeout=60)
    exit_codes = [worker.exitcode for worker in workers]
    assert [outcome[0] for outcome in outcomes] == ["ok", "ok"], (outcomes, exit_codes)
    assert outcomes[0][1] == outcomes[1][1]
    (entry,) = _entries(cache_dir)
    assert KernelCache(cache_dir).lookup(entry.stem) == entry
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]


def test_one_compiled_module_from_four_threads() -> None:
    model = _mha()
    snapshot = _snapshot(model)
    compiled = attnopt.compile(model, (_mha_input(),))
    shapes = [(2, 8), (3, 5), (1, 9), (4, 6)]
    errors: list[str] = []
    start = threading.Barrier(4)

    def work(batch: int, seq: int) -> None:
        try:
            start.wait(timeout=60)
            for _ in range(5):
                _assert_same_as_eager(model, compiled, _mha_input(batch, seq))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(f"{batch}x{seq}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=shape) for shape in shapes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    _assert_unharmed(model, snapshot, compiled, _mha_input(2, 4))


# --------------------------------------------------------------------------------------------
# the runtime's fallback to the torch kernels


@needs_interpreter
def test_triton_fallback_warns_once_and_matches_eager(cache_dir: Path) -> None:
    """A site the Triton kernel cannot serve (per-head sliding window) runs on the torch kernels
    with one RuntimeWarning naming the reason."""
    model, hidden = _mha(), _mha_input(2, 12)
    passes = "canonicalize,fuse-attention,sliding-window{window=4,heads=[0,1]}"
    with pytest.warns(RuntimeWarning) as caught:
        compiled = attnopt.compile(
            model, (hidden,), passes=passes, backend="triton-interpret", dynamic=False
        )
        actual = compiled(hidden)
    fallbacks = [w for w in caught if "using torch kernels" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    _assert_names(str(fallbacks[0].message), r"cannot serve this call: per-head variants")
    assert_close(actual, attnopt.compile(model, (hidden,), passes=passes, dynamic=False)(hidden))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled(hidden)


@needs_interpreter
def test_a_kernel_that_fails_at_run_time_falls_back_once_or_raises_with_strict(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generated kernel that raises at run time (a Triton compile error, say): that site runs
    the torch kernels from then on, with one warning naming the site, its variant and the error;
    strict=True raises BackendError instead."""
    import attnopt.runtime.triton.backend as triton_backend

    def broken(inputs: Any, attrs: Any, interpret: bool = False) -> Any:
        raise RuntimeError("PTX assembly failed: out of registers")

    monkeypatch.setattr(triton_backend, "run_attention_triton", broken)
    model, hidden = _mha(), _mha_input(2, 12)
    with pytest.warns(RuntimeWarning) as caught:
        compiled = attnopt.compile(model, (hidden,), backend="triton-interpret", dynamic=False)
        actual = compiled(hidden)
    failed = [w for w in caught if "failed" in str(w.message)]
    assert len(failed) == 1, [str(w.message) for w in caught]
    _assert_names(str(failed[0].message), r"site 0", r"variant dense", r"out of registers")
    _assert_same_as_eager(model, compiled, hidden)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert_close(compiled(hidden), actual)  # no second warning
    with pytest.raises(BackendError, match=r"site 0 \(variant dense\).*out of registers"):
        attnopt.compile(model, (hidden,), backend="triton-interpret", dynamic=False, strict=True)(
            hidden
        )
