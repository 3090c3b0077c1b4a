"""Example counts of the fuzz tests (the hypothesis profiles are registered in conftest.py).

Entry points: :data:`LONG_EXAMPLES`, :func:`examples`.
"""

from __future__ import annotations

import os

#: ``ATTNOPT_FUZZ_EXAMPLES`` (``make fuzz``): selects the long profile and its total example count.
LONG_EXAMPLES = os.environ.get("ATTNOPT_FUZZ_EXAMPLES")

#: The CI counts of all tests add up to about this many programs.
CI_TOTAL = 500


def examples(ci: int) -> int:
    """Examples for one test.

    Args:
        ci: its count in the CI profile.

    Returns:
        ``ci``, or in the long profile its share of ``ATTNOPT_FUZZ_EXAMPLES`` (the CI proportions
        scaled to that total).
    """
    if not LONG_EXAMPLES:
        return ci
    return max(ci, int(int(LONG_EXAMPLES) * ci / CI_TOTAL))
