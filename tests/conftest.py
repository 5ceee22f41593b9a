"""Test-session set-up.

Triton decides at kernel-definition time (when fused.py is imported) whether its kernels are compiled or
interpreted, so on a machine without CUDA the interpreter must be on before the first test module imports triton,
whichever module that is. Subprocesses that compile for a GPU (tests/test_fused_compile.py) remove it again.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
