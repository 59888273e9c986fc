"""Benchmarks of ldm_jax: input pipeline, codec, CLAP, U-Net training and sampling speed.

`benchmarks.run` holds one function per target (`ldm-jax bench TARGET`); the scripts beside it
(`data_pipeline.py`, `codec.py`, `clap.py`, `diffusion.py`) are thin command-line front ends.
"""
