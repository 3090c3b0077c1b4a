"""The runtime: executes generated programs with fast kernels; never captures or runs passes.

Layout: :mod:`attnopt.runtime.execute` (load a graph's program), :mod:`attnopt.runtime.dispatch`
(the ``K`` namespace: per-backend, per-variant kernel dispatch), :mod:`attnopt.runtime.cpu` (one
module per CPU kernel family), :mod:`attnopt.runtime.triton` (decide, launch, cache the generated
Triton kernels), :mod:`attnopt.runtime.memory`, :mod:`attnopt.runtime.roofline`.
"""
