"""Resolve a model spec from the command line: a zoo name or ``module:factory``.

Entry point: :func:`load_model`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LoadedModel:
    """A model and example inputs for it."""

    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any]


def load_model(
    spec: str, *, impl: str | None = "eager", batch: int = 2, seq: int = 16
) -> LoadedModel:
    """Load ``spec``: a zoo name (``bert``, ``gpt2``, ..., ``minilm``) or ``module:factory``.

    A factory returns a module, ``(module, args)`` or ``(module, args, kwargs)``; a module alone
    must have an ``example_inputs()`` method returning ``(args, kwargs)``.

    Args:
        spec: the model spec.
        impl: attention implementation for HF zoo models ("eager" or "sdpa").
        batch: batch size of the zoo example.
        seq: sequence length of the zoo example.

    Returns:
        The :class:`LoadedModel`.

    Raises:
        ValueError: for an unknown zoo name or a factory that returns something else.
    """
    if ":" not in spec:
        from attnopt import zoo

        if spec not in zoo.ZOO:
            raise ValueError(
                f"unknown model {spec!r}: use a zoo name ({', '.join(sorted(zoo.ZOO))}) or "
                "module.path:factory"
            )
        entry = zoo.get(spec)
        model = entry.build(impl if entry.hf else None)
        args, kwargs = entry.example(batch, seq)
        return LoadedModel(spec, model, tuple(args), dict(kwargs))
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load {spec!r}: {err}") from None
    made = factory()
    if isinstance(made, torch.nn.Module):
        if not hasattr(made, "example_inputs"):
            raise ValueError(
                f"{spec} returned a module without example_inputs(); return (model, args)"
            )
        args, kwargs = made.example_inputs()
        return LoadedModel(spec, made.eval(), tuple(args), dict(kwargs or {}))
    if (
        isinstance(made, tuple)
        and made
        and isinstance(made[0], torch.nn.Module)
        and len(made) in (2, 3)
    ):
        args = made[1] if isinstance(made[1], tuple) else (made[1],)
        kwargs = dict(made[2]) if len(made) == 3 else {}
        return LoadedModel(spec, made[0].eval(), args, kwargs)
    raise ValueError(f"{spec} must return a module, (module, args) or (module, args, kwargs)")
