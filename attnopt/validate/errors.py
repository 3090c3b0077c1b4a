"""The one exception type of :mod:`attnopt.validate`.

Entry point: :class:`ValidationError`.
"""

from __future__ import annotations


class ValidationError(ValueError):
    """Two models or their outputs cannot be compared (structure, shape, or inputs)."""
