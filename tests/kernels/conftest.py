"""Kernel tests: the Triton kernels run in the Triton interpreter on the CPU.

TRITON_INTERPRET must be set before fastunlearn.kernels is first imported (the @triton.jit
decorator reads it), so it is set here, when pytest collects this folder.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
