"""CPU kernels, one module per family; each skips the work its variant drops.

:mod:`~attnopt.runtime.cpu.dense` (SDPA flash path), :mod:`~attnopt.runtime.cpu.sliding_window`,
:mod:`~attnopt.runtime.cpu.block_sparse`, :mod:`~attnopt.runtime.cpu.neighborhood`,
:mod:`~attnopt.runtime.cpu.linear`, :mod:`~attnopt.runtime.cpu.hybrid`,
:mod:`~attnopt.runtime.cpu.linear_features` (blocked feature rows for the linear family),
:mod:`~attnopt.runtime.cpu.projection` (the oneDNN ``linear`` op), and
:mod:`~attnopt.runtime.cpu.common` (flash calls, log-sum-exp merges, masks, workspaces).
Their semantics are the op's, in :mod:`attnopt.ir`; every kernel is tested against that reference.
"""
