"""``torch.compile(model, backend="attnopt")``: attnopt as a TorchDynamo backend.

Entry points: :func:`attnopt_backend` (registered under the name ``"attnopt"`` through the
``torch_dynamo_backends`` entry point) and :func:`make_backend` for non-default options::

    compiled = torch.compile(model, backend=attnopt.dynamo.make_backend(
        passes="canonicalize,fuse-attention,sliding-window{window=512,sinks=4}"))

Each graph Dynamo hands over is captured with torch.export and compiled with attnopt. When shapes
change, Dynamo recompiles the frame once with symbolic sizes: that graph takes the sizes as extra
integer inputs. attnopt then compiles, on the graph's first call, a wrapper that reads each size
from the shape of the tensor it belongs to, captured with symbolic shapes: one program serves
every later shape (``run.attnopt_module.stats``). A size no tensor dim carries leaves that graph as
Dynamo gave it, with a warning.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import torch


def make_backend(passes: Any = "exact", backend: str = "auto") -> Callable:
    """A Dynamo backend that compiles each captured graph with these attnopt options.

    Args:
        passes: as for :func:`attnopt.compile`.
        backend: as for :func:`attnopt.compile`.

    Returns:
        ``backend(gm, example_inputs) -> callable``.
    """

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any) -> Callable:
        from attnopt.api import compile as attnopt_compile
        from attnopt.errors import AttnoptError

        if not all(isinstance(x, torch.Tensor) for x in example_inputs):
            return _symbolic_runner(gm, example_inputs, passes, backend)
        try:
            # Dynamo hands over graphs it has already specialised (it recompiles, with symbolic
            # sizes, when shapes change), and a symbolic torch.export run inside its compile
            # callback breaks the guards of the frame being compiled: capture this graph as is.
            compiled = attnopt_compile(
                gm, tuple(example_inputs), passes=passes, backend=backend, dynamic=False
            )
        except AttnoptError as err:
            warnings.warn(
                f"attnopt could not compile a Dynamo graph ({err}); running it as is",
                RuntimeWarning,
                stacklevel=2,
            )
            return gm.forward

        def run(*args: Any) -> Any:
            return compiled(*args)

        run.attnopt_module = compiled  # type: ignore[attr-defined]
        return run

    return compile_graph


class _SizesFromShapes(torch.nn.Module):
    """Dynamo's symbolic-size graph as a module of its activations only: the model's parameters
    and buffers (which Dynamo passes as inputs) are held as this module's own, so export sees
    them as constants, and each size input is read from the tensor dim with the same symbol."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: list[Any],
        sources: dict[int, tuple[int, int]],
        constants: set[int],
    ):
        super().__init__()
        self.gm = gm
        self.count = len(example_inputs)
        self.sources = sources  # size position -> (tensor position, dim)
        self.constants = constants
        for i in sorted(constants):
            value = example_inputs[i]
            if isinstance(value, torch.nn.Parameter):
                self.register_parameter(f"constant_{i}", value)
            else:
                self.register_buffer(f"constant_{i}", value, persistent=False)
        #: The positions of the inputs this module's forward takes, in order.
        self.activations = [i for i in range(self.count) if i not in sources and i not in constants]

    def forward(self, *tensors: torch.Tensor) -> Any:
        by_position = dict(zip(self.activations, tensors))
        for i in self.constants:
            by_position[i] = getattr(self, f"constant_{i}")
        inputs: list[Any] = []
        for i in range(self.count):
            if i in self.sources:
                tensor_position, dim = self.sources[i]
                inputs.append(by_position[tensor_position].shape[dim])
            else:
                inputs.append(by_position[i])
        return self.gm(*inputs)


def _constants(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> set[int]:
    """Inputs that are the model's parameters or buffers (Dynamo lifts them to inputs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {
        i
        for i, (node, value) in enumerate(zip(placeholders, example_inputs))
        if isinstance(value, torch.nn.Parameter)
        or (isinstance(value, torch.Tensor) and re.search(r"_(parameters|buffers)_", node.name))
    }


def _size_sources(
    gm: torch.fx.GraphModule, example_inputs: list[Any]
) -> dict[int, tuple[int, int]] | None:
    """For each size input, the (tensor input, dim) whose symbolic size it is; None when some
    size is carried by no tensor dim (or an input is neither a tensor nor a size)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dims: dict[str, tuple[int, int]] = {}
    for position, node in enumerate(placeholders):
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt):
                    dims.setdefault(str(size), (position, dim))
    sources = {}
    for position, value in enumerate(example_inputs):
        if isinstance(value, torch.Tensor):
            continue
        if not isinstance(value, (torch.SymInt, int)) or str(value) not in dims:
            return None
        sources[position] = dims[str(value)]
    return sources


def _symbolic_runner(
    gm: torch.fx.GraphModule, example_inputs: list[Any], passes: Any, backend: str
) -> Callable:
    """The callable for a graph with size inputs: compiled with symbolic shapes on its first call
    (a torch.export inside Dynamo's compile callback would break the frame's guards)."""
    sources = _size_sources(gm, example_inputs)
    if sources is None:
        warnings.warn(
            "attnopt: a Dynamo graph takes sizes no input tensor carries; it runs as Dynamo "
            "gave it (attention not optimised for this graph)",
            RuntimeWarning,
            stacklevel=3,
        )
        return gm.forward
    wrapper = _SizesFromShapes(gm, example_inputs, sources, _constants(gm, example_inputs))

    @torch._dynamo.disable
    def run(*args: Any) -> Any:
        tensors = tuple(args[i] for i in wrapper.activations)
        compiled = getattr(run, "attnopt_module", None)
        if compiled is None:
            from attnopt.api import compile as attnopt_compile
            from attnopt.errors import AttnoptError

            try:
                compiled = attnopt_compile(wrapper, tensors, passes=passes, backend=backend)
            except AttnoptError as err:
                warnings.warn(
                    f"attnopt could not compile a Dynamo graph ({err}); running it as is",
                    RuntimeWarning,
                    stacklevel=2,
                )
                compiled = wrapper
            run.attnopt_module = compiled  # type: ignore[attr-defined]
        return compiled(*tensors)

    return run


#: The default backend: ``torch.compile(model, backend="attnopt")``.
attnopt_backend = make_backend()
