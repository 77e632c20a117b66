"""Fused kernels: one file per op family (reference, Triton kernels, launcher, op, functional).

Import the family you need (fastwidth.kernels.attention, .readout_ce, .norm, .act, .stats);
fastwidth.kernels.dispatch picks torch or Triton.
"""
