import os

import torch

# Triton kernels are checked on the CPU through the Triton interpreter; the variable must be set before
# anything imports triton, which is why it lives here and not in the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
