"""The runtime's malloc tuning: applied once on glibc, skipped when asked."""

from __future__ import annotations

import sys

import pytest
import torch

import attnopt
from attnopt.runtime import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_retain_freed_memory_is_idempotent_on_glibc():
    first = memory.retain_freed_memory()
    assert memory.retain_freed_memory() is first
    assert first is True  # this machine runs glibc


def test_compile_can_leave_malloc_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "retain_freed_memory", lambda: calls.append(1) or True)
    x = torch.randn(2, 3)
    attnopt.compile(torch.nn.Linear(3, 3).eval(), (x,), retain_memory=False)
    assert calls == []
    attnopt.compile(torch.nn.Linear(3, 3).eval(), (x,))
    assert calls == [1]
