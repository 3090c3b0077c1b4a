"""Generated split-K decode kernels against attnopt.ir.attention_reference, in Triton's interpreter.

Small caches (tens of keys, 16-key blocks) so every case spans several blocks and splits: GQA
ratios 1/2/4 and MQA, 1..3 queries, bool/additive masks with broadcasting, bias, causal, softcap,
strided views of a static cache, rows with no visible key, fp32 and fp16; plus the dispatch of
decode-shaped dense calls to these kernels and the real compiler accepting the template.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from attnopt.codegen.triton_decode import MAX_DECODE_ROWS, DecodeKernelConfig, render_decode_kernel
from attnopt.errors import BackendError
from attnopt.ir import AttentionAttrs, AttentionOperands
from attnopt.ir.attention_reference import attention_reference
from attnopt.runtime.triton.backend import AttentionKernel, run_attention_triton, triton_kernel_for
from attnopt.runtime.triton.cache import KernelCache
from attnopt.runtime.triton.decode import (
    DecodeCall,
    DecodeKernel,
    decode_num_splits,
    decode_shape,
    triton_decode_attention,
)
from attnopt.runtime.triton.loader import triton_interpreter_ready
from attnopt.tolerances import assert_close

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
IN_PROCESS = triton_interpreter_ready()
needs_interpreter = pytest.mark.skipif(
    not IN_PROCESS, reason="triton was imported without TRITON_INTERPRET; see test_in_subprocess"
)
SCALE = 0.2


@dataclass(frozen=True)
class Case:
    """One decode call: shapes, dtype, the op's attributes and the forced split count."""

    name: str
    q_heads: int = 4
    kv_heads: int = 2
    q_len: int = 1
    kv_len: int = 70
    head_dim: int = 32
    batch: int = 2
    dtype: torch.dtype = torch.float32
    mask: str | None = None  # "bool-padding" [B,1,1,Sk], "additive-heads" [1,Hq,Sq,Sk]
    bias: bool = False
    causal: bool = False
    softcap: float | None = None
    splits: int | None = 3


CASES = [
    Case("mha-one-split", q_heads=2, kv_heads=2, splits=1),
    Case("gqa2-three-splits"),
    Case("gqa4-q3-causal", q_heads=8, q_len=3, causal=True),
    Case("mqa-auto-splits", q_heads=4, kv_heads=1, splits=None, kv_len=129),
    Case("bool-padding-empty-row", mask="bool-padding"),
    Case("additive-heads-q2-bias", q_len=2, mask="additive-heads", bias=True),
    Case("softcap-causal-q2", q_len=2, causal=True, softcap=3.0, splits=2),
    Case("d80-padded", head_dim=80, splits=2),
    Case("f16-gqa4-bool", q_heads=8, dtype=torch.float16, mask="bool-padding", splits=5),
]


def make_inputs(case: Case, seed: int = 0) -> dict:
    """q and k/v as ``cache[:, :, :kv_len]`` views of a larger cache, with the case's mask/bias."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    cache_shape = (case.batch, case.kv_heads, case.kv_len + 13, case.head_dim)
    inputs = {
        "q": randn(case.batch, case.q_heads, case.q_len, case.head_dim).to(case.dtype),
        "k": randn(*cache_shape).to(case.dtype)[:, :, : case.kv_len],
        "v": randn(*cache_shape).to(case.dtype)[:, :, : case.kv_len],
        "mask": None,
        "bias": None,
    }
    if case.mask == "bool-padding":
        keep = torch.rand(case.batch, 1, 1, case.kv_len, generator=gen) > 0.3
        keep[-1] = False  # the last batch element sees no key
        inputs["mask"] = keep
    elif case.mask == "additive-heads":
        inputs["mask"] = randn(1, case.q_heads, case.q_len, case.kv_len)
    if case.bias:
        inputs["bias"] = randn(case.batch, 1, case.q_len, case.kv_len)
    return inputs


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> KernelCache:
    return KernelCache(tmp_path_factory.mktemp("decode-kernels"))


@needs_interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_reference(case: Case, kernel_cache: KernelCache) -> None:
    inputs = make_inputs(case)
    assert not inputs["k"].is_contiguous()
    call = DecodeCall(
        **inputs, scale=SCALE, causal=case.causal, softcap=case.softcap, splits=case.splits
    )
    out = triton_decode_attention(call, interpret=True, cache=kernel_cache)
    expected = attention_reference(**inputs, scale=SCALE, causal=case.causal, softcap=case.softcap)
    assert out.shape == expected.shape and out.dtype == case.dtype
    assert_close(out, expected)
    if case.mask == "bool-padding":
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@needs_interpreter
def test_splits_agree(kernel_cache: KernelCache) -> None:
    inputs = make_inputs(Case("splits", kv_len=100))
    outs = [
        triton_decode_attention(
            DecodeCall(**inputs, scale=SCALE, splits=splits), interpret=True, cache=kernel_cache
        )
        for splits in (1, 2, 7)
    ]
    assert_close(outs[1], outs[0])
    assert_close(outs[2], outs[0])


@needs_interpreter
def test_dense_decode_site_runs_the_decode_kernels() -> None:
    inputs = make_inputs(Case("dispatch", q_heads=8, kv_len=256, batch=1, mask="bool-padding"))
    inputs["mask"] = inputs["mask"] | True  # one row that sees everything
    attrs = AttentionAttrs(scale=SCALE, causal=True)
    run = run_attention_triton(
        [inputs["q"], inputs["k"], inputs["v"], inputs["mask"]], attrs, interpret=True
    )
    assert run.kernel is not None and run.kernel.startswith("_attn_decode_"), run
    expected = attention_reference(
        inputs["q"], inputs["k"], inputs["v"], mask=inputs["mask"], scale=SCALE, causal=True
    )
    assert_close(run.output, expected)


@needs_interpreter
def test_empty_cache_gives_zeros() -> None:
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 0, 32)
    out = triton_decode_attention(DecodeCall(q, k, k), interpret=True)
    assert out.shape == q.shape and not out.any()


def test_kernel_choice_by_shape() -> None:
    def operands(q_len: int, kv_len: int, q_heads: int = 16) -> AttentionOperands:
        q = torch.empty(1, q_heads, q_len, 64, device="meta")
        k = torch.empty(1, 4, kv_len, 64, device="meta")
        return AttentionOperands.of([q, k, k])

    attrs = AttentionAttrs(scale=SCALE)
    assert isinstance(triton_kernel_for(operands(1, 4096), attrs, interpret=True), DecodeKernel)
    assert isinstance(triton_kernel_for(operands(16, 4096), attrs, interpret=True), DecodeKernel)
    assert isinstance(triton_kernel_for(operands(64, 4096), attrs, interpret=True), AttentionKernel)
    assert isinstance(triton_kernel_for(operands(1, 100), attrs, interpret=True), AttentionKernel)
    too_many_rows = operands(16, 4096, q_heads=4 * (MAX_DECODE_ROWS // 16 + 1))
    assert isinstance(triton_kernel_for(too_many_rows, attrs, interpret=True), AttentionKernel)
    windowed = AttentionAttrs(scale=SCALE, variant="sliding_window", window_left=64)
    assert isinstance(
        triton_kernel_for(operands(1, 4096), windowed, interpret=True), AttentionKernel
    )
    assert not decode_shape(torch.empty(1, 6, 1, 64), torch.empty(1, 4, 4096, 64))


def test_split_count_fills_the_device() -> None:
    assert decode_num_splits(4, 8192, 64, programs=264) == 32  # 4 kv-head items, 132 SMs x 2
    assert decode_num_splits(4, 1024, 64, programs=264) == 4  # at least 4 blocks per split
    assert decode_num_splits(512, 8192, 64, programs=264) == 1
    assert decode_num_splits(1, 10, 64, programs=264) == 1


def test_unsupported_calls_say_why() -> None:
    q, k = torch.empty(1, 4, 1, 32), torch.empty(1, 2, 300, 32)
    assert "splits" in DecodeCall(q, k, k, splits=0).unsupported()
    assert "multiple" in DecodeCall(torch.empty(1, 3, 1, 32), k, k).unsupported()
    rows = DecodeCall(torch.empty(1, 2 * MAX_DECODE_ROWS, 2, 32), k, k).unsupported()
    assert "rows" in rows
    with pytest.raises(BackendError, match="decode"):
        triton_decode_attention(DecodeCall(q, k, k, splits=0), interpret=True)


def test_render_names_and_config_checks() -> None:
    config = DecodeKernelConfig(64, 64, causal=True, mask_kind="bool", gqa_group=4, dtype="float16")
    source = render_decode_kernel(config)
    assert config.kernel_name == "_attn_decode_causal_maskbool_gqa4_d64_f16"
    assert f"def {config.kernel_name}(" in source and f"def {config.merge_kernel_name}(" in source
    assert "GQA_GROUP = tl.constexpr(4)" in source
    other = DecodeKernelConfig(64, 64, causal=True, mask_kind="bool", gqa_group=2, dtype="float16")
    assert other.kernel_name != config.kernel_name
    for bad in ({"head_dim": 0}, {"mask_kind": "dense"}, {"gqa_group": 0}, {"softcap": -1.0}):
        with pytest.raises(ValueError):
            DecodeKernelConfig(**{"head_dim": 64, "head_dim_v": 64, **bad})


def test_in_subprocess() -> None:
    """When triton was imported before TRITON_INTERPRET was set, run this file again with it set."""
    if IN_PROCESS:
        pytest.skip("the kernel tests ran in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    command += ["-k", "not test_in_subprocess and not compiles_for_hopper"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import tempfile
    from pathlib import Path
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from attnopt.codegen.triton_decode import DecodeKernelConfig, render_decode_kernel
    from attnopt.runtime.triton.cache import KernelCache, kernel_cache_key

    config = DecodeKernelConfig(128, 128, causal=True, mask_kind="bool", has_bias=True,
                                gqa_group=4, softcap=30.0, dtype="float16")
    source = render_decode_kernel(config)
    key = kernel_cache_key(source, config.to_json(), triton.__version__, "cuda-sm90")
    module = KernelCache(Path(tempfile.mkdtemp())).load_module(key, source, {})
    pointers = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "Out": "*fp16", "Mask": "*u8",
                "Bias": "*fp16", "PartOut": "*fp32", "PartLse": "*fp32"}
    for kernel, constexprs in ((module.SPLIT_KERNEL, {"BLOCK_R": 16, "BLOCK_N": 64}),
                               (module.MERGE_KERNEL, {"BLOCK_S": 32})):
        signature = {name: pointers.get(name, "i32") for name in kernel.arg_names}
        signature.update({name: "constexpr" for name in constexprs})
        if "sm_scale" in signature:
            signature["sm_scale"] = "fp32"
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "num_stages": 2})
        assert ".entry " + kernel.fn.__name__ in compiled.asm["ptx"]
        print("compiled", kernel.fn.__name__)
    """
)


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu() -> None:
    """The interpreter is lenient; the real compiler (through PTX) must accept the template too."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", _COMPILE_SCRIPT]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_kernels_on_gpu(case: Case, kernel_cache: KernelCache) -> None:
    inputs = {k: None if v is None else v.cuda() for k, v in make_inputs(case).items()}
    call = DecodeCall(**inputs, scale=SCALE, causal=case.causal, softcap=case.softcap)
    out = triton_decode_attention(call, cache=kernel_cache)
    expected = attention_reference(**inputs, scale=SCALE, causal=case.causal, softcap=case.softcap)
    assert_close(out, expected)
