"""Triton linear-attention kernels (rendered by attnopt.codegen.triton_linear, launched by
attnopt.runtime.triton.linear) in the Triton interpreter.

The kernels run in one child process started with ``TRITON_INTERPRET=1`` (Triton reads it when
triton is first imported, whatever this pytest process did); the child checks every case against
:func:`attnopt.ir.linear_attention.linear_attention_reference` and reports JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from attnopt.codegen.triton_linear import LinearKernelConfig, render_linear_kernel

# (feature map, causal, (Hq, Hkv), (Sq, Sk), Dv, masked)
CASES = [
    (name, causal, heads, lengths, dv, masked)
    for name in ("elu", "relu")
    for causal in (False, True)
    for heads, lengths, dv, masked in (
        ((2, 2), (37, 37), 16, False),
        ((4, 2), (20, 45), 8, True),
        ((4, 1), (45, 20), 24, True),
    )
] + [
    (name, causal, (4, 2), (33, 40), 16, True)
    for name in ("favor", "cosformer")  # features in torch, kernel with the identity map
    for causal in (False, True)
]


def _case_id(case) -> str:
    name, causal, heads, lengths, dv, masked = case
    return f"{name}-{'causal' if causal else 'full'}-h{heads[0]}x{heads[1]}-s{lengths[0]}x{lengths[1]}-dv{dv}-{'mask' if masked else 'nomask'}"


def _run_cases() -> dict[str, bool]:
    """Child process body: every case against the naive quadratic form (fp32 tolerances)."""
    import torch

    from attnopt.ir.linear_attention import linear_attention_reference as linear_attention_naive
    from attnopt.ir.linear_attention import make_feature_map
    from attnopt.runtime.triton.linear import triton_linear_attention
    from attnopt.tolerances import exact_tolerance

    tolerance = exact_tolerance(torch.float32)
    results = {}
    for case in CASES:
        name, causal, (q_heads, kv_heads), (q_len, kv_len), dv, masked = case
        generator = torch.Generator().manual_seed(len(results))
        q = torch.randn(2, q_heads, q_len, 16, generator=generator)
        k = torch.randn(2, kv_heads, kv_len, 16, generator=generator)
        v = torch.randn(2, kv_heads, kv_len, dv, generator=generator)
        mask = None
        if masked:
            mask = torch.zeros(2, 1, 1, kv_len)
            mask[1, ..., -5:] = float("-inf")
            mask[0, ..., 2] = float("-inf")
        feature_map = make_feature_map(name, 16, num_features=32, seed=0)
        expected = linear_attention_naive(q, k, v, feature_map, causal=causal, mask=mask)
        if name in ("elu", "relu"):
            config = LinearKernelConfig(feature_map=name, causal=causal)
            actual = triton_linear_attention(
                q, k, v, config, mask=mask, chunk=16, block_m=16, interpret=True
            )
        else:
            max_len = max(q_len, kv_len)
            q_positions = torch.arange(q_len) + kv_len - q_len
            k_positions = torch.arange(kv_len)
            fq = feature_map(q, is_query=True, positions=q_positions, max_len=max_len)
            fk = feature_map(k, is_query=False, positions=k_positions, max_len=max_len)
            eps = 1e-6  # in the kernel's true units, as linear_attention adds it
            if fq.log_scale is not None:
                log_k = fk.log_scale.repeat_interleave(q_heads // kv_heads, dim=1)
                eps = 1e-6 * torch.exp(-(fq.log_scale + log_k))[..., 0]
            config = LinearKernelConfig(feature_map="identity", causal=causal)
            actual = triton_linear_attention(
                fq.values, fk.values, v, config, mask=mask, eps=eps, chunk=16, interpret=True
            )
        close = torch.allclose(actual, expected, atol=tolerance.atol, rtol=tolerance.rtol)
        results[_case_id(case)] = bool(close)
        if not close:
            print((actual - expected).abs().max().item(), _case_id(case), file=sys.stderr)
    return results


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bool]:
    cache_dir = tmp_path_factory.mktemp("linear-kernels")
    env = dict(os.environ, TRITON_INTERPRET="1", ATTNOPT_CACHE_DIR=str(cache_dir))
    done = subprocess.run(
        [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_naive_in_interpreter(interpreter_results, case):
    assert interpreter_results[_case_id(case)]


@pytest.mark.parametrize("feature_map", ["elu", "relu", "identity"])
@pytest.mark.parametrize("causal", [False, True])
def test_rendered_source_is_specialised_and_valid_python(feature_map, causal):
    config = LinearKernelConfig(feature_map=feature_map, causal=causal)
    source = render_linear_kernel(config)
    compile(source, f"<{config.variant}>", "exec")
    assert f"def _linattn_fwd_{config.variant}(" in source
    assert ("_kvstate(" in source) is not causal
    others = {"elu": "tl.exp(x)", "relu": "tl.maximum(x, 0.0)"}
    for name, expression in others.items():
        assert (expression in source) is (name == feature_map)


def test_unknown_feature_map_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="identity"):
        render_linear_kernel(LinearKernelConfig(feature_map="favor"))


if __name__ == "__main__" and "--child" in sys.argv:
    print(json.dumps(_run_cases()))
