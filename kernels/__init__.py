"""Fused Triton kernels, each beside its launcher and torch reference. Installed as trajinv.kernels."""
