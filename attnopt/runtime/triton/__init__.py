"""The generated Triton kernels at run time: which node runs on which kernel, launch, and cache.

:mod:`~attnopt.runtime.triton.backend` (the node -> kernel decision, used both to run and to list
``cm.kernels``), :mod:`~attnopt.runtime.triton.launch` (attention kernels: the call, launch),
:mod:`~attnopt.runtime.triton.linear` (linear-attention kernels: launch),
:mod:`~attnopt.runtime.triton.blocks` (the kernel's block lists, derived from ``BlockMeta``),
:mod:`~attnopt.runtime.triton.loader` (import through the cache, compiled or interpreted),
:mod:`~attnopt.runtime.triton.cache` (the one on-disk kernel cache). Sources are rendered by
:mod:`attnopt.codegen`.
"""
