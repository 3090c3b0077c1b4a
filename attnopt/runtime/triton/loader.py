"""Import generated kernel modules through the kernel cache, compiled or interpreted.

Entry points: :func:`load_kernel_module`, :func:`environment_reason`, :func:`interpreter_reason`,
:func:`triton_interpreter_ready`, :func:`device_capability`.

Triton chooses between its compiler and its interpreter in two places:

* each ``@triton.jit`` function, when its module executes, from ``triton.knobs.runtime.interpret``.
  :func:`load_kernel_module` sets that knob only while attnopt's own generated module executes
  (``triton.knobs.runtime.scope()`` restores the knob and ``TRITON_INTERPRET`` afterwards), so
  attnopt's kernels are interpreted exactly when a call asks for it (``interpret=True``);
* Triton's own library functions the kernels call (``tl.sum``, ``tl.max``, ``tl.zeros``,
  ``tl.cdiv``), once, when ``triton.language`` is first imported, from ``TRITON_INTERPRET`` in
  the environment at that moment. That choice is process-wide and attnopt never makes it: the
  interpreter needs the user to set ``TRITON_INTERPRET=1`` before anything imports triton
  (``import torch._dynamo`` does), and compiled kernels need it unset.

:func:`environment_reason` says which of these a call is missing; the caller then runs the torch
kernels.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

import torch

from attnopt.runtime.triton.cache import KernelCache, kernel_cache_key

_MODULES: dict[tuple[object, str, bool, str], ModuleType] = {}
_LOAD_LOCK = threading.Lock()


def triton_interpreter_ready() -> bool:
    """Whether Triton's library functions are interpreted, which the interpreter needs.

    Returns:
        True when triton is installed and was first imported with ``TRITON_INTERPRET=1``.
    """
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.zeros, InterpretedFunction)


def interpreter_reason() -> str | None:
    """Why attnopt's kernels cannot run in Triton's interpreter in this process, or None.

    Returns:
        A one-line reason, or None when ``interpret=True`` calls can run.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not triton_interpreter_ready():
        return (
            "the Triton interpreter needs TRITON_INTERPRET=1 in the environment before triton is "
            "first imported (Triton fixes its library's mode then; attnopt never sets it)"
        )
    return None


def environment_reason(device: torch.device, interpret: bool) -> str | None:
    """Why this process cannot run a generated kernel on ``device``, or None when it can.

    Args:
        device: the device of the call's tensors.
        interpret: whether the call asks for the interpreter. Only explicit: a process whose
            triton runs interpreted still refuses ``interpret=False``, so automatic dispatch
            never picks the slow interpreter.

    Returns:
        A one-line reason, or None.
    """
    if interpret:
        return interpreter_reason()
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type != "cuda":
        return f"tensors are on {device.type}: the Triton kernel needs CUDA (or interpret=True)"
    if triton_interpreter_ready():
        return "triton was imported with TRITON_INTERPRET=1: only interpret=True can run"
    return None


def device_capability(device: torch.device, interpret: bool) -> str:
    """The device part of the kernel cache key.

    Args:
        device: the tensors' device.
        interpret: whether the Triton interpreter runs the kernel.

    Returns:
        ``"interpreter"``, or e.g. ``"cuda-sm90"`` / ``"hip-gfx942"``.
    """
    if interpret:
        return "interpreter"
    if torch.version.hip is not None:
        return "hip-" + torch.cuda.get_device_properties(device).gcnArchName
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda-sm{major}{minor}"


class KernelConfig(Protocol):
    """What :func:`load_kernel_module` needs of a kernel config (frozen, so hashable)."""

    @property
    def kernel_name(self) -> str:
        """The main kernel's function name."""
        ...

    def to_json(self) -> str:
        """The config as canonical JSON."""
        ...


def load_kernel_module(
    config: KernelConfig,
    render: Callable[[Any], str],
    *,
    device: str,
    interpret: bool,
    cache: KernelCache | None = None,
) -> ModuleType:
    """Import the generated module of a kernel config through the cache, once per process.

    The entry's key is :func:`~attnopt.runtime.triton.cache.kernel_cache_key` of the source, the
    config, the Triton version and ``device``. The module's ``@triton.jit`` functions are
    decorated for the interpreter when ``interpret`` is set, for the compiler otherwise; the
    knob is restored when the module has executed.

    Args:
        config: the kernel config (rendered only on the first call for it).
        render: ``config -> module source``.
        device: the device capability string (see :func:`device_capability`).
        interpret: decorate the kernels for Triton's interpreter.
        cache: the kernel cache; None uses the default directory (``ATTNOPT_CACHE_DIR``).

    Returns:
        The imported module.
    """
    import triton

    cache = cache if cache is not None else KernelCache()
    memo_key = (config, device, interpret, str(cache.directory))
    with _LOAD_LOCK:
        module = _MODULES.get(memo_key)
        if module is not None:
            return module
        source = render(config)
        config_json = config.to_json()
        key = kernel_cache_key(source, config_json, triton.__version__, device)
        metadata = {
            "kernel": config.kernel_name,
            "config": config_json,
            "triton": triton.__version__,
            "device": device,
        }
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = interpret
            module = cache.load_module(key, source, metadata)
        _MODULES[memo_key] = module
        return module
