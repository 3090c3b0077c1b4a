"""Static KV caches: kv_append grows a buffer made by static_cache in place (also under
inference_mode), concatenates anything else, and never writes memory it did not allocate."""

from __future__ import annotations

import pytest
import torch

from attnopt.ir import Graph, TensorType, get_op
from attnopt.ir.core_ops import AtenAttrs
from attnopt.passes import PassManager
from attnopt.runtime.kv_cache import append_kv, static_cache


def _prefix(length: int = 5) -> torch.Tensor:
    return torch.randn(2, 3, length, 4)


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_append_grows_the_buffer_in_place(mode):
    context = {
        "grad": torch.enable_grad,
        "no_grad": torch.no_grad,
        "inference_mode": torch.inference_mode,
    }[mode]
    with context():
        prefix = _prefix()
        buffer = static_cache(prefix, capacity=8)
        view = buffer[:, :, :5]
        for step in range(3):
            new = torch.randn(2, 3, 1, 4)
            expected = torch.cat([view, new], dim=2)
            grown = append_kv(view, new)
            assert torch.equal(grown, expected)
            assert grown.data_ptr() == buffer.data_ptr()  # no copy: a view of the buffer
            assert grown.shape[2] == 6 + step
            view = grown


def test_anything_else_is_concatenated_and_its_memory_untouched():
    storage = torch.randn(2, 3, 8, 4)
    view = storage[:, :, :5]  # not made by static_cache: the rest of storage is someone's
    before = storage.clone()
    grown = append_kv(view, torch.randn(2, 3, 1, 4))
    assert grown.data_ptr() != storage.data_ptr()
    assert torch.equal(storage, before)
    # a full buffer, another dtype, a view not starting at the buffer's start: concatenated
    buffer = static_cache(_prefix(), capacity=5)
    assert append_kv(buffer, torch.randn(2, 3, 1, 4)).data_ptr() != buffer.data_ptr()
    assert append_kv(buffer[:, :, :3], torch.randn(2, 3, 1, 4, dtype=torch.float64)).dtype == (
        torch.float64
    )
    shifted = buffer[:, :, 1:3]
    out = append_kv(shifted, torch.ones(2, 3, 1, 4))
    assert torch.equal(out, torch.cat([shifted, torch.ones(2, 3, 1, 4)], dim=2))
    assert not torch.equal(buffer[:, :, 3], torch.ones(2, 3, 4))


def test_capacity_is_checked():
    with pytest.raises(ValueError, match="capacity 3"):
        static_cache(_prefix(), capacity=3)
    with pytest.raises(ValueError, match="batch, kv_heads, seq, head_dim"):
        static_cache(torch.randn(3, 4), capacity=8)


def test_static_kv_cache_pass_rewrites_cache_concatenations_of_inputs_only():
    graph = Graph()
    graph.meta["symbol_hints"] = {"s0": 5}
    past = graph.add_input("past", TensorType((2, 3, "s0", 4), torch.float32))
    new = graph.add_input("new", TensorType((2, 3, 1, 4), torch.float32))
    args = '[[[{"$v": 0}, {"$v": 1}], -2], {}]'
    cache = graph.make_node("aten", [past, new], AtenAttrs(target="aten.cat.default", args=args))
    graph.append(cache)
    other = graph.make_node(
        "aten", [cache.output, new], AtenAttrs(target="aten.cat.default", args=args)
    )
    graph.append(other)
    graph.outputs = [cache.output, other.output]
    PassManager.parse("static-kv-cache").run(graph)
    counts = graph.op_counts()
    assert counts.get("kv_append") == 1 and counts.get("aten.cat.default") == 1, counts
    inputs = [torch.randn(2, 3, 5, 4), torch.randn(2, 3, 1, 4)]
    (node,) = graph.find("kv_append")
    assert torch.equal(get_op("kv_append").impl(inputs, node.attrs), torch.cat(inputs, dim=2))
