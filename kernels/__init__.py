"""Fused Triton kernels (importable without diffusers or DeepSpeed)."""
