"""The test process's environment: Triton's interpreter when there is no GPU, and HF offline mode.

Triton picks interpreter or compiler for its own library functions when ``triton.language`` is
first imported, so ``TRITON_INTERPRET=1`` has to be in the environment before that: this root
conftest is imported before any test module (note that ``import torch._dynamo`` imports triton).
Should it still be too late, the kernel tests in tests/codegen rerun themselves in a subprocess
with the variable set.

It is only set on machines without CUDA, where nothing in the process can run compiled Triton
kernels anyway; attnopt interprets only when a call passes ``interpret=True``, so automatic
dispatch in other tests does not change.

The test process never reaches the Hugging Face hub: every zoo model is built from a config and
MiniLM loads from its package directory with ``local_files_only=True``; offline mode makes a
stray download fail fast instead of hanging on the network.

Generated kernels go to a kernel cache directory of this test process (``ATTNOPT_CACHE_DIR``,
removed at exit; one per pytest-xdist worker) unless the caller set one: the suite neither writes
to the user's ``~/.cache/attnopt`` nor shares a directory between concurrent workers.

Under pytest-xdist (``make test`` runs two workers on a 2-core machine) each worker runs torch
single-threaded: two workers with two intra-op threads each oversubscribe the cores.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")

if not os.environ.get("ATTNOPT_CACHE_DIR"):
    _cache_dir = tempfile.mkdtemp(prefix=f"attnopt-test-kernels-{_WORKER or 'main'}-")
    os.environ["ATTNOPT_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

if _WORKER is not None and os.environ.get("ATTNOPT_TEST_THREADS", "1") != "0":
    torch.set_num_threads(int(os.environ.get("ATTNOPT_TEST_THREADS", "1")))
