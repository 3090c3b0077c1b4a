"""The runtime's linear kernel: same products as F.linear, through oneDNN where it is faster."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnopt.runtime.cpu import projection as dense
from attnopt.runtime.cpu.projection import linear, onednn_linear_available


@pytest.mark.parametrize("shape", [(2, 300, 64), (700, 64), (1, 1, 4096, 64), (0, 64), (2, 0, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_f_linear(shape, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    weight = torch.randn(96, 64, generator=generator)
    bias = torch.randn(96, generator=generator) if with_bias else None
    out = linear(x, weight, bias)
    assert out.shape == (*shape[:-1], 96)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_linear_uses_onednn_for_large_fp32_products(monkeypatch):
    if not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(dense, "onednn_fp32_faster", lambda: True)  # where it wins
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Recorder:
        def __getattr__(self, name):
            if name == "_linear_pointwise":
                return lambda *args: calls.append(args) or real(*args)
            return getattr(torch.ops.mkldnn, name)

    monkeypatch.setattr(dense.torch.ops, "mkldnn", Recorder(), raising=False)
    x, weight = torch.randn(512, 256), torch.randn(256, 256)
    linear(x, weight, None)
    assert len(calls) == 1
    linear(x[:1], weight, None)  # 65K multiply-adds: F.linear
    linear(x.double(), weight.double(), None)  # float64: F.linear
    assert len(calls) == 1


def test_linear_follows_weight_changes():
    """No packed copy of the weight is kept: changing it in place changes the result."""
    x, weight = torch.randn(512, 256), torch.randn(256, 256)
    before = linear(x, weight, None)
    weight.mul_(2.0)
    torch.testing.assert_close(linear(x, weight, None), 2 * before, rtol=1e-5, atol=1e-4)


def test_linear_keeps_autograd_through_f_linear():
    x = torch.randn(512, 256, requires_grad=True)
    weight = torch.randn(256, 256)
    out = linear(x, weight, None)
    out.sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(512, 256))


def test_linear_with_strided_and_expanded_bias():
    x, weight = torch.randn(256, 512), torch.randn(384, 512)
    full = torch.randn(768)
    for bias in (full[::2], torch.tensor([0.5]).expand(384)):
        torch.testing.assert_close(
            linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4
        )


def test_linear_keeps_bias_gradients_and_forward_ad():
    x, weight = torch.randn(256, 512), torch.randn(384, 512)
    bias = torch.randn(384, requires_grad=True)
    linear(x, weight, bias).sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((384,), 256.0))
    tangent = torch.randn(256, 512)
    _, jvp = torch.func.jvp(lambda t: linear(t, weight, None), (x,), (tangent,))
    torch.testing.assert_close(jvp, F.linear(tangent, weight), rtol=1e-5, atol=1e-4)


def test_linear_follows_autocast():
    x, weight = torch.randn(256, 512), torch.randn(384, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, weight, None).dtype == F.linear(x, weight).dtype == torch.bfloat16


@pytest.mark.parametrize("choice, expected", [("onednn", True), ("mkl", False)])
def test_the_fp32_kernel_choice_can_be_fixed(monkeypatch, choice, expected):
    monkeypatch.setenv("ATTNOPT_CPU_LINEAR", choice)
    dense.onednn_fp32_faster.cache_clear()
    try:
        assert dense.onednn_fp32_faster() is expected
    finally:
        dense.onednn_fp32_faster.cache_clear()


def test_the_measured_choice_follows_this_cpu(monkeypatch):
    """Without the variable, the choice is a measurement (a bool, the same on every call)."""
    monkeypatch.delenv("ATTNOPT_CPU_LINEAR", raising=False)
    dense.onednn_fp32_faster.cache_clear()
    try:
        first = dense.onednn_fp32_faster()
        assert first in (True, False) and dense.onednn_fp32_faster() is first
    finally:
        dense.onednn_fp32_faster.cache_clear()
