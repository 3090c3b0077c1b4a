"""The generated program: every constant it writes must be valid Python."""

from __future__ import annotations

import torch

import attnopt


class _NonFiniteScalars(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.where(x > 0, x, x * float("inf"))
        return torch.sub(y + float("-inf"), x, alpha=2.0)


def test_non_finite_scalars_are_emitted_as_floats():
    x = torch.randn(3, 4)
    for passes in ("none", "exact"):
        cm = attnopt.compile(_NonFiniteScalars(), (x,), passes=passes)
        torch.testing.assert_close(cm(x), _NonFiniteScalars()(x), equal_nan=True)
        assert "float('inf')" in cm.source or "float('-inf')" in cm.source
