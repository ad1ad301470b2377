"""Triton kernels of fastmtt (installed as `fastmtt.kernels`)."""
