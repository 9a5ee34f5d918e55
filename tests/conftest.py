"""Before any test module imports Triton (through sliceserve's kernels): without a GPU, the
kernels run in Triton's interpreter, which must be chosen before they are compiled."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
