"""Fuzzing of the IR text parser: it raises :class:`attnopt.ir.parser.IRParseError` or returns a
graph, never anything else.

Inputs are random text, random token soup in the IR's own vocabulary, and mutations (deleted,
duplicated, swapped or edited lines and tokens) of real graphs printed by ``str(graph)`` from
``attnopt.capture`` of generated attention programs. An unmutated text must round-trip:
``parse(str(g)) == g``.
"""

from __future__ import annotations

import functools
import re
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt
from attnopt.ir.ops import registered_ops
from attnopt.ir.parser import IRParseError, parse
from tests.fuzz.profiles import examples
from tests.fuzz.strategies import Spec, build

#: Seeds of the specs whose captured (and fused) graphs seed the mutations.
_SEED_GRAPHS = 6


@functools.cache
def _real_texts() -> tuple[str, ...]:
    """IR texts of a few real graphs: captured, and after exact fusion."""
    texts = []
    for seed in range(_SEED_GRAPHS):
        program = build(_spec_for(seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = attnopt.capture(program.model, program.args, program.kwargs)
            cm = attnopt.compile(
                program.model, program.args, program.kwargs, passes="exact", dynamic=False
            )
        texts.append(str(graph))
        texts.append(str(cm.graph))
    return tuple(texts)


def _spec_for(seed: int) -> Spec:
    """A fixed, varied spec (hypothesis' ``example()`` is not for use inside tests)."""
    forms = ("matmul_mul", "sdpa", "bmm", "einsum", "baddbmm", "prescale_q")
    masks = ("bool_padding", "causal", "additive_padding", "none", "arbitrary_bool", "causal")
    return Spec(
        batch=2, heads=2 + (seed % 2) * 2, kv_heads=2, q_len=5 + seed, kv_len=5 + seed,
        head_dim=4, source=("hidden", "qkv_bhsd", "qkv_bshd")[seed % 3], cross=False,
        score=forms[seed], scale=None, softmax="softmax", fp32_softmax=seed % 2 == 0,
        dtype="float32", mask=masks[seed], fill=("-inf", "finfo_min")[seed % 2],
        mask_where=seed % 2 == 1, mask_heads=False, causal_build="triu",
        causal_bottom_right=False, fully_masked_row=False,
        bias=("none", "alibi", "param")[seed % 3], softcap=30.0 if seed == 3 else None,
        bias_before_softcap=False,
        gqa_form="expand", dropout="module", merge="transpose_reshape",
        sdpa_is_causal=True, sdpa_enable_gqa=True, sdpa_scale_arg=True, return_weights=False,
        magnitude=1.0, nonfinite="none", seed=seed,
    )  # fmt: skip


def _parse_or_reject(text: str) -> None:
    try:
        parse(text)
    except IRParseError:
        pass


#: Fragments of the IR text vocabulary for token soup and for edits.
_VOCAB = (
    "graph(",
    ")",
    "(",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "=",
    "%x",
    "%0",
    "%a.b",
    "_",
    "return",
    "f32",
    "f16",
    "bf16",
    "f64",
    "b8",
    "i64",
    "i32",
    "int",
    "float",
    "bool",
    '"s0"',
    "s0",
    "attention",
    "matmul",
    "softmax",
    "transpose",
    "reshape",
    "mul",
    "add",
    "where",
    "param",
    "linear",
    "cast",
    "masked_fill",
    "scale",
    "dim",
    "dim0",
    "shape",
    "dtype",
    "name",
    "scalar",
    "true",
    "false",
    "none",
    "nan",
    "inf",
    "-inf",
    "0",
    "1",
    "-1",
    "2.5",
    "1e300",
    "1e-5",
    "-0",
    "99999999999999999999",
    "\n",
    " ",
    "  %x: f32[2, 3] = ",
    '"',
    "\\",
    "#",
    "é",
    "\t",
)


#: Attribute values of every type and some out of range or malformed.
_LITERALS = (
    "0",
    "1",
    "-1",
    "0.5",
    "-0.0",
    "1e400",
    "-1e400",
    "inf",
    "-inf",
    "nan",
    "true",
    "false",
    "none",
    "f32",
    "b8",
    '"x"',
    '"\\q"',
    '"\\u12"',
    "[]",
    "[1, 2]",
    "[1.5]",
    "[none]",
    "[[1]]",
    '"aten.nope.default"',
    '"[[{\\"$v\\": 7}], {}]"',
    "99999999999999999999",
)


@st.composite
def _token_soup(draw: st.DrawFn) -> str:
    body = "".join(draw(st.lists(st.sampled_from(_VOCAB), max_size=60)))
    prefix = draw(st.sampled_from(("", "graph(", "graph() {\n", "graph(%x: f32[2]) {\n")))
    return prefix + body


_TOKEN_RE = re.compile(r"%[A-Za-z0-9_.]+|\"(?:[^\"\\]|\\.)*\"|-?\d+(?:\.\d*)?(?:e[-+]?\d+)?|\w+|\S")


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(_real_texts()))
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(
                ("drop_line", "dup_line", "swap_lines", "edit_token", "drop_token", "dup_token",
                 "swap_tokens", "truncate", "insert_text", "attr_value", "op_name")
            )
        )  # fmt: skip
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(0, len(lines) - 1))
        tokens = _TOKEN_RE.findall(lines[i])
        if kind == "drop_line":
            del lines[i]
        elif kind == "dup_line":
            lines.insert(j, lines[i])
        elif kind == "swap_lines":
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "truncate":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif kind == "attr_value" and "=" in lines[i]:
            # another literal after an attribute's '=' (wrong type, range or syntax)
            at = draw(st.sampled_from([m.end() for m in re.finditer(r"\w=", lines[i])] or [0]))
            rest = re.sub(r"^(\"(?:[^\"\\]|\\.)*\"|\[[^\]]*\]|[^,}]*)", "", lines[i][at:])
            lines[i] = lines[i][:at] + draw(st.sampled_from(_LITERALS)) + rest
        elif kind == "op_name" and " = " in lines[i]:
            lines[i] = re.sub(r"= \w+\(", f"= {draw(st.sampled_from(registered_ops()))}(", lines[i])
        elif kind == "insert_text":
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.sampled_from(_VOCAB)) + lines[i][at:]
        elif tokens:
            t = draw(st.integers(0, len(tokens) - 1))
            u = draw(st.integers(0, len(tokens) - 1))
            if kind == "edit_token":
                tokens[t] = draw(st.sampled_from(_VOCAB + tuple(tokens)))
            elif kind == "drop_token":
                del tokens[t]
            elif kind == "dup_token":
                tokens.insert(u, tokens[t])
            else:
                tokens[t], tokens[u] = tokens[u], tokens[t]
            lines[i] = " ".join(tokens)
    return "\n".join(lines)


def test_real_texts_round_trip() -> None:
    """The unmutated seeds parse back to the graph they came from."""
    for text in _real_texts():
        assert str(parse(text)) == text


@settings(max_examples=examples(150))
@given(text=st.text(max_size=200))
def test_random_text_is_rejected_cleanly(text: str) -> None:
    """Arbitrary text: a graph or IRParseError."""
    _parse_or_reject(text)


@settings(max_examples=examples(150))
@given(text=_token_soup())
def test_token_soup_is_rejected_cleanly(text: str) -> None:
    """Sequences of IR tokens: a graph or IRParseError."""
    _parse_or_reject(text)


@pytest.mark.slow
@settings(max_examples=examples(300))
@given(text=_mutated())
def test_mutated_ir_is_rejected_cleanly(text: str) -> None:
    """Mutated real IR text: a graph or IRParseError."""
    _parse_or_reject(text)
