"""Hypothesis profiles of the fuzz tests.

``ci`` (the default) runs a few hundred programs in a couple of minutes on one CPU thread;
``long`` is selected by setting ``ATTNOPT_FUZZ_EXAMPLES`` (``make fuzz``), which also gives its
example count. Both derandomise: a failure reproduces from the same run, and the shrunk spec is
printed with it.

Example counts per test come from :func:`tests.fuzz.profiles.examples`.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings

from tests.fuzz.profiles import LONG_EXAMPLES

_COMMON = dict(
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)
settings.register_profile("ci", **_COMMON)
settings.register_profile("long", **_COMMON)
settings.load_profile("long" if LONG_EXAMPLES else "ci")

# One intra-op thread, as the CI budget is measured (the fuzz programs are tiny anyway).
torch.set_num_threads(1)
