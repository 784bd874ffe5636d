"""Sparse decode kernels for cross-layer transcoders (XLA reference, Pallas TPU and GPU).

Empty until the sparse-kernel issue lands; the package exists so the layout in DESIGN.md is
importable from the start.
"""
