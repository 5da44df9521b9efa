"""Attention and cache kernels.

Every kernel has a torch reference that runs anywhere (CPU in CI, and the ground truth the GPU
versions are compared with); Triton/CUDA versions are imported lazily on CUDA devices only.
"""
