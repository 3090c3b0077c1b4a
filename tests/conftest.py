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
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
