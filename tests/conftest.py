import os
import sys
from pathlib import Path

import torch

# Triton kernels are checked on the CPU through the Triton interpreter; the variable must be set before
# anything imports triton, which is why it lives here, in the one file pytest loads before every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The shared helpers (tests/helpers.py) are imported as `helpers` from every test directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
