"""Flax layers whose parameters carry logical axis names.

Every parameter of every model names its axes (`ldm_jax.axes.LOGICAL`) through
`nn.with_logical_partitioning`; `ldm_jax.parallel` places them on the mesh by those names alone.
These builders return the stock Flax layers with named initialisers: the initial values are the
layers' own defaults, only boxed with the names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn

from ldm_jax.axes import LOGICAL

Names = Sequence[str | None]


def named(init: Callable, names: Names) -> Callable:
    """`init`, its result boxed with one logical name per axis (None: an axis never split)."""
    unknown = [n for n in names if n is not None and n not in LOGICAL]
    if unknown:
        raise ValueError(f"unknown logical axis name {unknown[0]!r}; the names are those of "
                         "ldm_jax.axes.LOGICAL")
    return nn.with_logical_partitioning(init, tuple(names))


def dense(features: int, names: Names, *, name: str, use_bias: bool = True,
          kernel_init: Callable = nn.linear.default_kernel_init, **kw) -> nn.Dense:
    """`nn.Dense` with a kernel named `(in, out)` and a bias named `(out,)`."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=named(kernel_init, names),
                    bias_init=named(nn.initializers.zeros_init(), names[-1:]), name=name, **kw)


def conv(features: int, kernel_size: Sequence[int], *, name: str,
         names: Names = ("conv_in", "conv_out"),
         kernel_init: Callable = nn.linear.default_kernel_init, **kw) -> nn.Conv:
    """`nn.Conv` with a kernel named `(conv_width, ..., in, out)` and a bias named `(out,)`."""
    kernel_names = ("conv_width",) * len(kernel_size) + tuple(names)
    return nn.Conv(features, tuple(kernel_size), kernel_init=named(kernel_init, kernel_names),
                   bias_init=named(nn.initializers.zeros_init(), names[-1:]), name=name, **kw)


def embed(num_embeddings: int, features: int, *, name: str,
          names: Names = ("vocab", "embed"),
          embedding_init: Callable = nn.linear.default_embed_init, **kw) -> nn.Embed:
    """`nn.Embed` with its table named `(rows, width)`."""
    return nn.Embed(num_embeddings, features, embedding_init=named(embedding_init, names),
                    name=name, **kw)


def layer_norm(axis: str, *, name: str, **kw) -> nn.LayerNorm:
    """`nn.LayerNorm` whose scale and bias are named `(axis,)`."""
    return nn.LayerNorm(scale_init=named(nn.initializers.ones_init(), (axis,)),
                        bias_init=named(nn.initializers.zeros_init(), (axis,)), name=name, **kw)


def group_norm(groups: int, axis: str, *, name: str, **kw) -> nn.GroupNorm:
    """`nn.GroupNorm` whose scale and bias are named `(axis,)`."""
    return nn.GroupNorm(groups, scale_init=named(nn.initializers.ones_init(), (axis,)),
                        bias_init=named(nn.initializers.zeros_init(), (axis,)), name=name, **kw)
