"""Built-in passes."""
from attnopt.passes.base import Pass, PassContext, PassManager, PassResult

__all__ = ["Pass", "PassContext", "PassManager", "PassResult"]
