"""Triton kernels, installed as `rankfast.kernels` (one module per fused operation)."""
