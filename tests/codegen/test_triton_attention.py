"""Generated Triton attention kernels against attnopt.ir.attention_reference, in Triton's interpreter.

Every variant (dense, causal with q_len != kv_len, GQA/MQA, bool and additive masks with
broadcasting, bias, softcap, sliding window with sinks, block-sparse with and without full-block
lists; fp32 and fp16; head sizes 16/32/64/128 and 80) must match `attention_reference` within
`attnopt.tolerances`. See conftest.py for how TRITON_INTERPRET is set.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from attnopt.codegen.triton_attention import (
    AttentionKernelConfig,
    autotune_configs,
    interpreter_tile,
    render_attention_kernel,
)
from attnopt.errors import BackendError
from attnopt.ir.attention_reference import attention_reference, visible_keys_mask
from attnopt.ir.block_sparse import BlockMeta, block_meta_visible
from attnopt.runtime.triton import loader as triton_loader
from attnopt.runtime.triton.blocks import block_meta_from_block_mask, split_full_blocks
from attnopt.runtime.triton.cache import KernelCache
from attnopt.runtime.triton.launch import AttentionCall, triton_attention, triton_can_run
from attnopt.runtime.triton.loader import triton_interpreter_ready
from attnopt.tolerances import assert_close

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
IN_PROCESS = triton_interpreter_ready()
needs_interpreter = pytest.mark.skipif(
    not IN_PROCESS, reason="triton was imported without TRITON_INTERPRET; see test_in_subprocess"
)


@dataclass(frozen=True)
class Case:
    """One kernel call: shapes, dtype and the op's attributes."""

    name: str
    head_dim: int = 32
    q_len: int = 17
    kv_len: int = 17
    batch: int = 1
    q_heads: int = 2
    kv_heads: int = 2
    head_dim_v: int | None = None
    dtype: torch.dtype = torch.float32
    causal: bool = False
    mask: str | None = None  # "bool-padding", "bool-full", "additive-padding", "additive-full"
    bias: str | None = None  # "heads" ([1, H, Sq, Sk]) or "full" ([B, H, Sq, Sk])
    softcap: float | None = None
    window: tuple[int | None, int | None, int] | None = None  # (left, right, sinks)
    blocks: tuple[int, int, bool, bool] | None = None  # (block_q, block_k, per_head, split_full)


F16 = torch.float16
CASES = [
    Case("dense-d16-s1", head_dim=16, q_len=1, kv_len=1),
    Case("dense-d32-s7", head_dim=32, q_len=7, kv_len=7),
    Case("dense-d64-s17", head_dim=64),
    Case("dense-d128-s129", head_dim=128, q_len=129, kv_len=129, q_heads=1, kv_heads=1),
    Case("dense-d80-s197-padded", head_dim=80, q_len=197, kv_len=197, q_heads=1, kv_heads=1),
    Case("dense-dv-differs", head_dim=64, head_dim_v=32, q_len=17, kv_len=129),
    Case("causal-square", head_dim=64, q_len=129, kv_len=129, causal=True),
    Case("causal-q-shorter", head_dim=32, q_len=7, kv_len=197, causal=True),
    Case("causal-decode", head_dim=64, q_len=1, kv_len=129, causal=True),
    Case("causal-q-longer-empty-rows", head_dim=32, q_len=17, kv_len=7, causal=True),
    Case("mqa-4to1-causal", head_dim=64, q_heads=4, kv_heads=1, causal=True),
    Case("gqa-8to2", head_dim=32, q_heads=8, kv_heads=2),
    Case("bool-padding-b2", batch=2, mask="bool-padding"),
    Case("bool-full-rows-masked", q_len=17, kv_len=129, mask="bool-full"),
    Case("additive-padding-b2", batch=2, mask="additive-padding", q_len=7, kv_len=129),
    Case("additive-full-causal", q_len=17, kv_len=129, mask="additive-full", causal=True),
    Case("bias-causal", head_dim=64, q_len=129, kv_len=129, bias="heads", causal=True),
    Case("softcap-bias-bool", batch=2, q_len=17, kv_len=129, softcap=5.0, bias="full", mask="bool-padding"),
    Case("window-sinks-causal", head_dim=64, q_len=197, kv_len=197, window=(20, 0, 3), causal=True),
    Case("window-both-sides", q_len=17, kv_len=129, window=(16, 8, 0)),
    Case("window-right-only", q_len=129, kv_len=129, window=(None, 5, 0)),
    Case("window-left-only-gqa", q_len=129, kv_len=129, window=(40, None, 2), q_heads=4, kv_heads=2),
    Case("sparse-shared", q_len=129, kv_len=129, blocks=(32, 32, False, False)),
    Case("sparse-per-head-full-causal", q_len=197, kv_len=197, causal=True, blocks=(32, 64, True, True)),
    Case("sparse-bool-q-shorter", q_len=40, kv_len=129, causal=True, mask="bool-full", blocks=(16, 32, True, True)),
    Case("f16-causal", head_dim=64, q_len=129, kv_len=129, causal=True, dtype=F16),
    Case("f16-gqa-additive", head_dim=128, q_len=17, kv_len=197, q_heads=4, kv_heads=1, mask="additive-full", dtype=F16),
    Case("f16-window-d80", head_dim=80, q_len=129, kv_len=129, window=(32, 0, 4), causal=True, dtype=F16),
    Case("f16-sparse", head_dim=64, q_len=129, kv_len=129, blocks=(64, 32, True, True), dtype=F16),
    Case("f16-softcap-bias", head_dim=16, q_len=7, kv_len=17, softcap=20.0, bias="heads", dtype=F16),
]  # fmt: skip


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> KernelCache:
    return KernelCache(tmp_path_factory.mktemp("kernels"))


def make_inputs(case: Case, seed: int = 0) -> dict:
    """Random q, k, v and the case's mask, bias and block metadata."""
    gen = torch.Generator().manual_seed(seed)
    dv = case.head_dim_v or case.head_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    inputs = {
        "q": randn(case.batch, case.q_heads, case.q_len, case.head_dim).to(case.dtype),
        "k": randn(case.batch, case.kv_heads, case.kv_len, case.head_dim).to(case.dtype),
        "v": randn(case.batch, case.kv_heads, case.kv_len, dv).to(case.dtype),
    }
    if case.mask is not None:
        kind, shape = case.mask.split("-")
        if shape == "padding":  # [B, 1, 1, Sk]: batch b sees its first kv_len - 3*b keys
            lengths = torch.tensor([case.kv_len - 3 * b for b in range(case.batch)])
            allowed = (torch.arange(case.kv_len)[None, :] < lengths[:, None])[:, None, None, :]
        else:  # [1, 1, Sq, Sk], with query row 3 seeing nothing
            allowed = torch.rand(1, 1, case.q_len, case.kv_len, generator=gen) > 0.3
            allowed[..., 3, :] = False
        if kind == "bool":
            inputs["mask"] = allowed
        else:
            noise = randn(*allowed.shape)
            inputs["mask"] = torch.where(allowed, noise, torch.tensor(float("-inf")))
    if case.bias is not None:
        bias_batch = 1 if case.bias == "heads" else case.batch
        inputs["bias"] = randn(bias_batch, case.q_heads, case.q_len, case.kv_len)
    if case.blocks is not None:
        block_q, block_k, per_head, split_full = case.blocks
        shape = (1, case.q_heads if per_head else 1)
        shape += (math.ceil(case.q_len / block_q), math.ceil(case.kv_len / block_k))
        block_mask = torch.rand(*shape, generator=gen) > 0.5
        block_mask[..., 0] = True  # sink-like first block; other rows may see nothing
        inputs["block_meta"] = block_meta_from_block_mask(block_mask, block_q, block_k)
    return inputs


def run_case(case: Case, inputs: dict, cache: KernelCache) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's and the reference's output for one case."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    window = case.window or (None, None, 0)
    visible = None
    if case.window is not None:
        left, right, sinks = window
        visible = visible_keys_mask(
            case.q_len,
            case.kv_len,
            window_left=left,
            window_right=right,
            sinks=sinks,
            device=q.device,
        )
    if case.blocks is not None:
        visible = block_meta_visible(inputs["block_meta"], case.q_len, case.kv_len)
    scale = 1.0 / math.sqrt(case.head_dim)
    call = AttentionCall(
        q, k, v,
        mask=inputs.get("mask"), bias=inputs.get("bias"), scale=scale, causal=case.causal,
        softcap=case.softcap, window_left=window[0], window_right=window[1], sinks=window[2],
        block_meta=inputs.get("block_meta"), split_full_blocks=bool(case.blocks and case.blocks[3]),
    )  # fmt: skip
    out = triton_attention(call, interpret=q.device.type != "cuda", cache=cache)
    expected = attention_reference(
        q, k, v,
        mask=inputs.get("mask"), bias=inputs.get("bias"), scale=scale, causal=case.causal,
        softcap=case.softcap, visible=visible,
    )  # fmt: skip
    return out, expected


@needs_interpreter
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_kernel_matches_reference(case: Case, kernel_cache: KernelCache) -> None:
    out, expected = run_case(case, make_inputs(case), kernel_cache)
    assert out.dtype == case.dtype
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()
    assert_close(out, expected)


@needs_interpreter
def test_rows_that_see_no_key_are_zero(kernel_cache: KernelCache) -> None:
    case = Case("empty", q_len=17, kv_len=7, causal=True)
    out, _ = run_case(case, make_inputs(case), kernel_cache)
    # With Sq - Sk = 10, rows 0..9 have no visible key under bottom-right causal alignment.
    assert torch.equal(out[:, :, :10], torch.zeros_like(out[:, :, :10]))


@needs_interpreter
@pytest.mark.parametrize("sinks", [0, 4])
def test_sliding_window_skips_blocks_outside(sinks: int, kernel_cache: KernelCache) -> None:
    # One query at position 196 sees keys 180..196 (+ sinks). Keys in blocks the kernel must
    # skip are NaN: a kernel that loaded and masked them would produce NaN (NaN * 0 = NaN).
    case = Case("skip", head_dim=32, q_len=1, kv_len=197, window=(16, 0, sinks))
    inputs = make_inputs(case)
    _, expected = run_case(case, inputs, kernel_cache)
    poisoned = dict(inputs)
    for name in ("k", "v"):
        poisoned[name] = inputs[name].clone()
        poisoned[name][:, :, 64:128] = float("nan")
    out, _ = run_case(case, poisoned, kernel_cache)
    assert_close(out, expected)


@needs_interpreter
def test_block_sparse_skips_unlisted_blocks(kernel_cache: KernelCache) -> None:
    case = Case("sparse-skip", q_len=64, kv_len=128, blocks=(32, 32, False, True))
    inputs = make_inputs(case)
    block_mask = torch.tensor([[True, True, False, False], [False, True, False, True]])
    inputs["block_meta"] = block_meta_from_block_mask(block_mask, 32, 32)
    _, expected = run_case(case, inputs, kernel_cache)
    for name in ("k", "v"):
        inputs[name] = inputs[name].clone()
        inputs[name][:, :, 64:96] = float("nan")  # key block 2 is listed for no query block
    out, _ = run_case(case, inputs, kernel_cache)
    assert_close(out, expected)


@needs_interpreter
def test_strided_inputs_from_packed_qkv(kernel_cache: KernelCache) -> None:
    packed = torch.randn(2, 19, 3, 3 * 40, generator=torch.Generator().manual_seed(1))
    q, k, v = (part.transpose(1, 2) for part in packed.split(40, dim=-1))  # [B, H, S, D] views
    call = AttentionCall(q, k, v, causal=True)
    out = triton_attention(call, interpret=True, cache=kernel_cache)
    assert_close(out, attention_reference(q, k, v, causal=True))


def test_block_meta_from_block_mask_lists_blocks_ascending() -> None:
    block_mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    meta = block_meta_from_block_mask(block_mask, 16, 32)
    assert (meta.block_q, meta.block_k) == (16, 32)
    assert meta.kv_counts.tolist() == [[[2, 0, 3]]]
    assert meta.kv_indices[0, 0, 0, :2].tolist() == [0, 2]
    assert meta.kv_indices[0, 0, 2].tolist() == [0, 1, 2]
    dense = block_meta_visible(meta, 48, 80)
    assert dense[0, 0, 0].tolist() == [True] * 32 + [False] * 32 + [True] * 16
    assert not dense[0, 0, 16:32].any()


def test_split_full_blocks() -> None:
    block_mask = torch.tensor([[True, False, True], [True, True, True]])
    meta = block_meta_from_block_mask(block_mask, 16, 16)
    partial, full = split_full_blocks(meta, q_len=32, kv_len=40, causal=True)
    # Offset 8: row 0 sees keys 0..8, so only row block 1 (rows 16..31) sees key block 0 fully;
    # key block 2 (keys 32..47) runs past kv_len, so it is never full.
    assert full.kv_counts.tolist() == [[[0, 1]]]
    assert full.kv_indices[0, 0, 1, 0].item() == 0
    assert partial.kv_counts.tolist() == [[[2, 2]]]
    assert partial.kv_indices.tolist() == [[[[0, 2], [1, 2]]]]
    together = block_meta_visible(partial, 32, 40) | block_meta_visible(full, 32, 40)
    assert torch.equal(together, block_meta_visible(meta, 32, 40))
    # Without causality every listed block inside the keys is full.
    partial, full = split_full_blocks(meta, q_len=32, kv_len=40, causal=False)
    assert full.kv_counts.tolist() == [[[1, 2]]] and partial.kv_counts.tolist() == [[[1, 1]]]


def test_render_names_and_constexprs() -> None:
    config = AttentionKernelConfig(head_dim=80, head_dim_v=80, causal=True, dtype="float32")
    kernel = render_attention_kernel(config)
    assert kernel.name == "_attn_fwd_dense_causal_d80_f32" == config.kernel_name
    assert f"def {kernel.name}(" in kernel.source
    assert "HEAD_DIM_PADDED = tl.constexpr(128)" in kernel.source
    assert "CAUSAL = tl.constexpr(True)" in kernel.source
    assert "KERNEL = _attn_fwd_dense_causal_d80_f32" in kernel.source
    compile(kernel.source, "<kernel>", "exec")


def _template_body(source: str, name: str) -> str:
    body = source.split('"""', 2)[2].replace(name, "KERNEL_NAME")
    body = re.sub(r"(?m)^[A-Z_0-9]+ = tl\.constexpr\(.*\)$", "", body)
    return re.sub(r"(?s)(AUTOTUNE|INTERPRETER)_CONFIGS = \[.*?\n\]", "", body)


def test_every_variant_renders_from_one_template() -> None:
    base = AttentionKernelConfig(head_dim=64, head_dim_v=64)
    variants = [
        base,
        replace(base, causal=True, mask_kind="bool", has_bias=True, gqa_group=4, softcap=30.0),
        replace(base, sparsity="sliding_window", window_left=128, window_right=0, sinks=4),
        replace(base, sparsity="block_sparse", block_q=64, block_k=32, has_full_blocks=True),
        replace(base, head_dim=80, head_dim_v=48, dtype="bfloat16", mask_kind="additive"),
    ]
    rendered = [render_attention_kernel(config) for config in variants]
    assert len({kernel.name for kernel in rendered}) == len(variants)
    bodies = {_template_body(kernel.source, kernel.name) for kernel in rendered}
    assert len(bodies) == 1


def test_tiles() -> None:
    sparse = AttentionKernelConfig(64, 64, sparsity="block_sparse", block_q=64, block_k=32)
    assert all(m <= 64 and n <= 32 for m, n, _, _ in autotune_configs(sparse))
    assert interpreter_tile(sparse)[:2] == (32, 32)
    assert interpreter_tile(replace(sparse, block_q=16, block_k=16))[:2] == (16, 16)
    assert AttentionKernelConfig(8, 8).head_dim_padded == 16


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask_kind": "float"},
        {"sparsity": "ring"},
        {"window_left": 4},
        {"sparsity": "block_sparse", "block_q": 24, "block_k": 32},
        {"head_dim": 512},
        {"softcap": 0.0},
        {"dtype": "float64"},
    ],
)
def test_config_rejects_bad_attributes(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AttentionKernelConfig(**{"head_dim": 64, "head_dim_v": 64, **kwargs})


def test_config_from_call() -> None:
    q, k, v = torch.zeros(1, 8, 5, 80), torch.zeros(1, 2, 9, 80), torch.zeros(1, 2, 9, 40)
    mask = torch.ones(9, dtype=torch.bool)
    call = AttentionCall(q, k, v, mask=mask, window_left=4, window_right=0, sinks=2)
    config = call.kernel_config()
    assert (config.gqa_group, config.mask_kind, config.sparsity) == (4, "bool", "sliding_window")
    assert (config.head_dim_padded, config.head_dim_v_padded, config.sinks) == (128, 64, 2)
    # No window: every key is visible, sinks are dropped.
    assert AttentionCall(q, k, v, sinks=3).kernel_config().sinks == 0
    meta = block_meta_from_block_mask(torch.ones(1, 1), 16, 16)
    sparse = AttentionCall(q, k, v, block_meta=meta)
    assert not sparse.kernel_config().has_full_blocks
    split = AttentionCall(q, k, v, block_meta=meta, split_full_blocks=True).kernel_config()
    assert (split.sparsity, split.block_q, split.has_full_blocks) == ("block_sparse", 16, True)


def test_can_run_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.zeros(1, 2, 4, 64)
    wide = torch.zeros(1, 2, 4, 512)
    assert triton_can_run(AttentionCall(wide, wide, q), interpret=True)
    double = q.double()
    assert "float64" in triton_can_run(AttentionCall(double, double, double), interpret=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert "broadcast" in triton_can_run(AttentionCall(q, q, q, mask=mask), interpret=True)
    assert "multiple" in triton_can_run(AttentionCall(torch.zeros(1, 3, 4, 64), q, q))
    meta = block_meta_from_block_mask(torch.ones(3, 1, dtype=torch.bool), 16, 16)
    assert "query blocks" in AttentionCall(q, q, q, block_meta=meta).unsupported()
    bf16 = q.bfloat16()
    assert "bfloat16" in AttentionCall(bf16, bf16, bf16).unsupported(interpret=True)
    assert AttentionCall(bf16, bf16, bf16).unsupported() is None
    if IN_PROCESS:
        assert triton_can_run(AttentionCall(q, q, q), interpret=True) is None
    # The interpreter is only used when asked for, even in a process that could interpret.
    assert "CUDA" in triton_can_run(AttentionCall(q, q, q))
    with pytest.raises(BackendError, match="CUDA"):
        triton_attention(AttentionCall(q, q, q))
    monkeypatch.setattr(triton_loader, "triton_interpreter_ready", lambda: False)
    assert "TRITON_INTERPRET" in triton_can_run(AttentionCall(q, q, q), interpret=True)


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
    from attnopt.codegen.triton_attention import AttentionKernelConfig, render_attention_kernel
    from attnopt.runtime.triton.cache import KernelCache, kernel_cache_key

    config = AttentionKernelConfig(80, 80, causal=True, mask_kind="bool", sparsity="sliding_window",
                                   window_left=64, window_right=0, sinks=4, dtype="float16")
    kernel = render_attention_kernel(config)
    key = kernel_cache_key(kernel.source, config.to_json(), triton.__version__, "cuda-sm90")
    module = KernelCache(Path(tempfile.mkdtemp())).load_module(key, kernel.source, {})
    pointers = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "Out": "*fp16", "Mask": "*u8",
                "Bias": "*fp16", "KvCounts": "*i32", "KvIndices": "*i32",
                "FullKvCounts": "*i32", "FullKvIndices": "*i32"}
    signature = {name: pointers.get(name, "i32") for name in module.KERNEL.arg_names}
    signature.update(sm_scale="fp32", BLOCK_M="constexpr", BLOCK_N="constexpr")
    source = ASTSource(module.KERNEL, signature, constexprs={"BLOCK_M": 128, "BLOCK_N": 64})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 8, "num_stages": 3})
    assert ".entry " + kernel.name in compiled.asm["ptx"]
    print("compiled", kernel.name)
    """
)


@pytest.mark.slow
def test_kernel_compiles_for_hopper_without_a_gpu() -> None:
    """The interpreter is lenient; the real compiler (through PTX) must accept the template too."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", _COMPILE_SCRIPT]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [c for c in CASES if c.dtype == F16], ids=lambda case: case.name)
def test_kernel_on_gpu(case: Case, kernel_cache: KernelCache) -> None:
    inputs = {
        name: value.cuda() if isinstance(value, torch.Tensor) else value
        for name, value in make_inputs(case).items()
    }
    if "block_meta" in inputs:
        meta = inputs["block_meta"]
        inputs["block_meta"] = BlockMeta(
            meta.block_q, meta.block_k, meta.kv_counts.cuda(), meta.kv_indices.cuda()
        )
    out, expected = run_case(case, inputs, kernel_cache)
    assert_close(out, expected)
