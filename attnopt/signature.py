"""Input signatures of a compiled module: which calls an already compiled program can serve.

Entry points: :func:`signature_key` (the exact key of a call: structure, shapes, dtypes, devices,
non-tensor values) and :class:`SymbolicSignature` (whether a call fits a program compiled with
symbolic dims, binding the symbols to the call's sizes).

A program captured with symbolic batch and sequence dims serves every call with the same
structure, dtypes, devices, non-tensor values and static dims, whose symbolic sizes lie in the
ranges torch.export proved for them and are not 0. Everything else is a new signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnopt.ir.symbolic import bind_symbols

__all__ = ["SymbolicSignature", "signature_key"]


def signature_key(flat: Sequence[Any], spec: Any) -> tuple:
    """The exact signature of a call (flattened inputs and their pytree spec)."""
    return (str(spec), *(_leaf(leaf, sizes=True) for leaf in flat))


def _leaf(leaf: Any, *, sizes: bool) -> tuple:
    """One input as a signature sees it: a tensor's sizes (or only its rank), dtype and device;
    any other value by type and repr."""
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape) if sizes else leaf.dim(), leaf.dtype, leaf.device.type)
    return ("C", type(leaf).__name__, repr(leaf))


class SymbolicSignature:
    """The calls a symbolic program serves.

    Args:
        flat: the flattened example inputs it was compiled for.
        spec: their pytree spec.
        input_positions: for each graph input, its index among ``flat``.
        input_types: the graph inputs' types (with symbolic dims).
        ranges: symbol name -> ``(lower, upper)`` (upper None: unbounded).
    """

    def __init__(
        self,
        flat: Sequence[Any],
        spec: Any,
        input_positions: Sequence[int],
        input_types: Sequence[Any],
        ranges: dict[str, tuple[int, int | None]],
    ):
        self.spec = str(spec)
        self.input_positions = list(input_positions)
        self.input_types = list(input_types)
        self.ranges = dict(ranges)
        self.leaves = [_leaf(leaf, sizes=False) for leaf in flat]

    def bind(self, flat: Sequence[Any], spec: Any) -> dict[str, int] | None:
        """The symbols' values for this call, or None when the program cannot serve it.

        Args:
            flat: the call's flattened inputs.
            spec: their pytree spec.

        Returns:
            Symbol name -> value, or None.
        """
        if str(spec) != self.spec or len(flat) != len(self.leaves):
            return None
        if any(_leaf(leaf, sizes=False) != want for leaf, want in zip(flat, self.leaves)):
            return None
        tensors = [flat[i] for i in self.input_positions]
        try:
            env = bind_symbols(self.input_types, tensors)
        except ValueError:
            return None
        for name, value in env.items():
            lower, upper = self.ranges.get(name, (0, None))
            # Export never proves a symbolic program for empty inputs (its range may still
            # start at 0): a size of 0 compiles per shape, where capture sees the real size.
            if value < max(lower, 1) or (upper is not None and value > upper):
                return None
        return env
