"""Compute kernels that torch does not provide fast enough on the hardware at hand."""
