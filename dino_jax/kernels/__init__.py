"""Kernels XLA:CPU does not fuse by itself, built on first use with the host's C++ compiler."""
