"""Read an ONNX model for import: load and check the file, convert tensors and dtypes.

Entry points: :func:`load_onnx`, :func:`is_onnx_source`, :func:`graph_inputs`,
:func:`torch_dtype`, :func:`tensor_from_proto`, :func:`default_opset`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from attnopt.errors import CaptureError

#: Opsets of the default ONNX domain attnopt imports (13: Softmax over one axis, axes inputs).
MIN_OPSET = 13

ONNX_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


def load_onnx(model: Any) -> Any:
    """An ``onnx.ModelProto`` from a path or a ModelProto, checked for what the importer needs.

    Args:
        model: a path to a ``.onnx`` file, or a ``ModelProto``.

    Returns:
        The ModelProto, external data loaded.

    Raises:
        CaptureError: not an ONNX model, an opset outside ``13..onnx.defs.onnx_opset_version()``,
            or external data that cannot be found.
    """
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise CaptureError(f"{path}: no such ONNX file")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # noqa: BLE001 - protobuf's decode errors vary by version
            raise CaptureError(
                f"{path} is not an ONNX model ({type(err).__name__}: {err}); give a .onnx file "
                "saved by onnx.save or torch.onnx.export"
            ) from None
        _check_proto(proto, str(path))
        _load_external(proto, path.parent, str(path))
        return proto
    if isinstance(model, onnx.ModelProto):
        _check_proto(model, "the ONNX model")
        _load_external(model, None, "the ONNX model")
        return model
    raise CaptureError(f"expected an ONNX file path or onnx.ModelProto, not {type(model).__name__}")


def _check_proto(proto: Any, where: str) -> None:
    import onnx

    if proto.ir_version == 0 or not proto.HasField("graph") or not proto.opset_import:
        raise CaptureError(
            f"{where} is not an ONNX model (no IR version, graph or opset); give a .onnx file "
            "saved by onnx.save or torch.onnx.export"
        )
    opset = default_opset(proto)
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise CaptureError(
            f"{where} uses ONNX opset {opset}; attnopt imports opsets {MIN_OPSET}..{newest}. "
            f"Convert it first: onnx.version_converter.convert_version(model, {MIN_OPSET + 4})"
        )
    if opset > newest:
        raise CaptureError(
            f"{where} uses ONNX opset {opset}, newer than the installed onnx {onnx.__version__} "
            f"knows ({newest}): upgrade onnx, or export the model with opset <= {newest}"
        )


def default_opset(proto: Any) -> int:
    """The version of the default (``ai.onnx``) domain a model imports."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _load_external(proto: Any, base: Path | None, where: str) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    external = [t for t in proto.graph.initializer if uses_external_data(t)]
    if not external:
        return
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if base is None or not (base / location).is_file():
            raise CaptureError(
                f"{where}: initializer {tensor.name!r} keeps its data in the external file "
                f"{location!r}, which is missing"
                + (f" (looked in {base})" if base else " (a ModelProto has no directory)")
                + ": put the data file next to the .onnx file, or load the model with "
                "onnx.load(path, load_external_data=True)"
            )
    load_external_data_for_model(proto, str(base))


def torch_dtype(elem_type: int, where: str = "") -> torch.dtype:
    """The torch dtype of an ONNX ``TensorProto`` element type."""
    try:
        return ONNX_DTYPES[elem_type]
    except KeyError:
        raise CaptureError(f"{where}: ONNX element type {elem_type} has no torch dtype") from None


def tensor_from_proto(tensor: Any) -> torch.Tensor:
    """A torch tensor holding an ONNX ``TensorProto``'s data."""
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    return torch.from_numpy(array.copy())


def graph_inputs(proto: Any) -> list[Any]:
    """The graph's real inputs (ValueInfos), without initializers listed as inputs."""
    initializers = {t.name for t in proto.graph.initializer}
    return [value for value in proto.graph.input if value.name not in initializers]


def input_dims(value_info: Any) -> list[int | str]:
    """A graph input's dims: ints, and dim names (or "?") for dynamic dims."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def is_onnx_source(model: Any) -> bool:
    """Whether ``model`` is something :func:`load_onnx` takes (a path or a ModelProto)."""
    if isinstance(model, (str, os.PathLike)):
        return True
    try:
        import onnx
    except ImportError:
        return False
    return isinstance(model, onnx.ModelProto)


__all__ = [
    "MIN_OPSET",
    "ONNX_DTYPES",
    "default_opset",
    "graph_inputs",
    "is_onnx_source",
    "load_onnx",
    "tensor_from_proto",
    "torch_dtype",
]
