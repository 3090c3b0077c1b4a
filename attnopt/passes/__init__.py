"""Built-in passes. Each is a frozen dataclass registered by its kebab-case name.

Entry points: :class:`Canonicalize`, :class:`FuseAttention`, and the pass API re-exported from
:mod:`attnopt.passes.base`.
"""

from attnopt.passes.base import Pass, PassContext, PassManager, PassResult, registered_passes
from attnopt.passes.canonicalize import Canonicalize
from attnopt.passes.fuse_attention import FuseAttention

__all__ = [
    "Canonicalize",
    "FuseAttention",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "registered_passes",
]
