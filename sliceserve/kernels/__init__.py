"""Triton kernels, each with a PyTorch reference beside it (the GPU fast path comes here)."""
