"""Fused Triton kernels of the engine, installed as `diffutron_engine.kernels` (one file per op)."""
