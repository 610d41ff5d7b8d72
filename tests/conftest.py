"""Test-wide set-up: Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it
is set here, before the test modules import trajinv.kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
