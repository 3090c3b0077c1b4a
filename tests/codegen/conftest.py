"""Run generated Triton kernels in Triton's interpreter when there is no GPU.

Triton picks interpreter or compiler for its own library functions when ``triton.language`` is
first imported, so ``TRITON_INTERPRET=1`` has to be in the environment before that. Setting it
here, at conftest import, works when nothing collected earlier imported triton (note that
``import torch._dynamo`` does). When it was too late, the kernel tests in
test_triton_attention.py rerun themselves in a subprocess with the variable set.

It is only set on machines without CUDA: there nothing else in the process can run Triton
kernels, so interpreting them changes nothing for other tests.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
