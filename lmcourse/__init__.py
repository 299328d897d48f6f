"""lmcourse: the companion package of a notebook-first course on recent language-model research.

Importing the package first makes Triton kernels usable on machines without a GPU: when no CUDA
device is visible and TRITON_INTERPRET is unset, it is set to "1" here, before any kernel is
defined (Triton reads the variable when a kernel is decorated, so setting it later has no effect).
"""
__version__ = "0.1.0"

import os as _os

if "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"
