"""Types of IR values: :class:`TensorType` (shape with symbolic dims, dtype) and :class:`ScalarType`.

Entry points: :class:`TensorType`, :class:`ScalarType`, :func:`dtype_name`, :func:`dtype_from_name`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
    torch.complex64: "c64",
    torch.complex128: "c128",
}
_NAME_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}

Dim = int | str
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def dtype_name(dtype: torch.dtype) -> str:
    """Short IR name of a torch dtype (``torch.float32`` -> ``"f32"``).

    Args:
        dtype: a torch dtype.

    Returns:
        The short name used in IR text.
    """
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no IR name") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`.

    Args:
        name: a short dtype name such as ``"bf16"``.

    Returns:
        The torch dtype.
    """
    try:
        return _NAME_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; known: {sorted(_NAME_DTYPES)}") from None


def is_dtype_name(name: str) -> bool:
    """Whether ``name`` is a short dtype name."""
    return name in _NAME_DTYPES


@dataclass(frozen=True)
class TensorType:
    """Shape and dtype of a tensor value. A dim is an int, or a str naming a symbolic size."""

    shape: tuple[Dim, ...]
    dtype: torch.dtype

    @property
    def rank(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        """True when every dim is a concrete int."""
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        """Number of elements (static shapes only)."""
        if not self.is_static:
            raise ValueError(f"numel of a symbolic shape {self}")
        return math.prod(self.shape)  # type: ignore[arg-type]

    def nbytes(self) -> int:
        """Bytes of a dense tensor of this type (static shapes only)."""
        return self.numel() * self.dtype.itemsize

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        """The same dtype with another shape."""
        return TensorType(tuple(shape), self.dtype)

    @staticmethod
    def of(tensor: torch.Tensor) -> TensorType:
        """The type of a concrete (or meta/fake) tensor; a symbolic size (``SymInt``) becomes
        its expression text (``"s0"``, ``"s0*s1"``)."""
        return TensorType(tuple(_dim_of(d) for d in tensor.shape), tensor.dtype)

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)}[{','.join(_dim_text(d) for d in self.shape)}]"


def _dim_of(size: Any) -> Dim:
    if isinstance(size, int):
        return size
    from attnopt.ir.symbolic import canonical_dim

    return canonical_dim(size.node.expr)


def _dim_text(dim: Dim) -> str:
    """A dim in IR text: ints and plain symbol names as they are, expressions as JSON strings."""
    if isinstance(dim, int) or _NAME.fullmatch(dim):
        return str(dim)
    return json.dumps(dim)


@dataclass(frozen=True)
class ScalarType:
    """A non-tensor value (a Python int, float or bool produced at run time)."""

    kind: str  # "int" | "float" | "bool"

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float", "bool"):
            raise ValueError(f"scalar kind must be int, float or bool, not {self.kind!r}")

    def __str__(self) -> str:
        return self.kind


Type = TensorType | ScalarType
