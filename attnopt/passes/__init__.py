"""Built-in passes. Each is a frozen dataclass registered by its kebab-case name.

Entry points: :class:`Canonicalize`, :class:`FuseAttention`, and the pass API re-exported from
:mod:`attnopt.passes.base`.
"""

from attnopt.passes.base import Pass, PassContext, PassManager, PassResult, registered_passes
from attnopt.passes.block_sparse import BlockSparse
from attnopt.passes.canonicalize import Canonicalize
from attnopt.passes.fuse_attention import FuseAttention
from attnopt.passes.head_prune import HeadPrune
from attnopt.passes.kv_cache import StaticKVCache
from attnopt.passes.linearize import Linearize
from attnopt.passes.neighborhood import Neighborhood
from attnopt.passes.precision import Precision
from attnopt.passes.remove_padding import RemovePadding
from attnopt.passes.sliding_window import SlidingWindow
from attnopt.passes.token_reduce import TokenMerge, TokenPrune

__all__ = [
    "BlockSparse",
    "Canonicalize",
    "FuseAttention",
    "HeadPrune",
    "Linearize",
    "Neighborhood",
    "Precision",
    "RemovePadding",
    "SlidingWindow",
    "StaticKVCache",
    "TokenMerge",
    "TokenPrune",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "registered_passes",
]
