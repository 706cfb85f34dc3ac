"""Shared test configuration.

* One torch thread keeps the suite fast on the 2-core CI machine.
* Without CUDA, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` must be set
  before anything imports triton (``make test`` sets it too).
"""

import os

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
