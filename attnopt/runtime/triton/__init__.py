"""The generated Triton kernels at run time: which node runs on which kernel, launch, and cache.

:mod:`~attnopt.runtime.triton.backend` (the node -> kernel decision, used both to run and to list
``cm.kernels``), :mod:`~attnopt.runtime.triton.launch` (load through the cache and launch),
:mod:`~attnopt.runtime.triton.cache` (the one on-disk kernel cache). Sources are rendered by
:mod:`attnopt.codegen`.
"""
