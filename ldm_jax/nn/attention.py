"""Multi-head attention and the pre-LayerNorm transformer block.

Scaled dot-product attention of "Attention Is All You Need" (Vaswani et al. 2017) computed by
`jax.nn.dot_product_attention`: `implementation="xla"` (the default; XLA's attention on every
backend) or `"cudnn"` (cuDNN's fused flash attention, NVIDIA GPUs only, bfloat16 or float16;
`check_attention_impl` refuses it elsewhere in one line), with the pre-LN
residual arrangement of GPT-2 / ViT (Xiong et al. 2020, "On Layer Normalization in the Transformer
Architecture"). Blocks serve the CLAP towers (self-attention with a key padding mask) and the
diffusion U-Net (self-attention plus cross-attention to padded text states).

Parameters name their axes (`ldm_jax.axes.LOGICAL`): the `query`, `key` and `value` kernels are
`[in, heads]` and `out` is `[heads, out]`, `mlp/fc1` is `[embed, mlp]` and `mlp/fc2` `[mlp, embed]`,
so the tensor axis splits them Megatron's way (column-parallel, then row-parallel).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.config import ConfigError
from ldm_jax.nn.layers import dense, layer_norm

ATTENTION_IMPLS = ("xla", "cudnn")


def check_attention_impl(impl: str, dtype, *, platform: str | None = None) -> None:
    """Refuses an attention implementation this platform or compute dtype cannot run.

    Args:
      impl: one of ATTENTION_IMPLS (a model's `attention_impl`).
      dtype: the model's compute dtype.
      platform: the JAX backend ("cpu", "gpu", "tpu"); default: `jax.default_backend()`.

    Raises:
      ConfigError: an unknown name, cuDNN off an NVIDIA GPU, or cuDNN in float32.
    """
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention_impl={impl!r} is unknown; use one of "
                          f"{', '.join(ATTENTION_IMPLS)}")
    if impl == "cudnn":
        platform = platform or jax.default_backend()
        if platform != "gpu":
            raise ConfigError(f"model.attention_impl='cudnn' needs an NVIDIA GPU; this JAX runs "
                              f"on {platform}: use 'xla'")
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ConfigError(f"model.attention_impl='cudnn' computes in bfloat16 or float16, "
                              f"not {jnp.dtype(dtype).name}: set model.dtype=bfloat16 or use "
                              "'xla'")


def combine_masks(key_mask: jax.Array | None, mask: jax.Array | None) -> jax.Array | None:
    """Joins a key padding mask and a general attention mask into one broadcastable mask.

    Args:
      key_mask: bool [B, S], True at real keys (None: all real).
      mask: bool broadcastable to [B, heads, T, S] (None: no constraint).

    Returns:
      bool [B, 1|heads, 1|T, S] or None when both are None.
    """
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask, bool)[:, None, None, :]
    if mask is None:
        return key_mask
    mask = jnp.asarray(mask, bool)
    return mask if key_mask is None else jnp.logical_and(mask, key_mask)


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention.

    Attributes:
      num_heads: number of heads.
      head_dim: width per head; default: query width // num_heads.
      out_features: output width; default: query width.
      use_bias: biases on the four projections.
      query_axis: logical name of the queries' features (`ldm_jax.axes.LOGICAL`).
      context_axis: that of the keys' and values' inputs; default: `query_axis`.
      out_axis: that of the output; default: `query_axis`.
      implementation: "xla" or "cudnn" (`jax.nn.dot_product_attention`'s).
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    query_axis: str = "embed"
    context_axis: str | None = None
    out_axis: str | None = None
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
                 key_mask: jax.Array | None = None, mask: jax.Array | None = None,
                 causal: bool = False) -> jax.Array:
        """Attends from `x` to `context` (to `x` itself when None).

        Args:
          x: queries [B, T, D].
          context: keys and values [B, S, Dc]; None for self-attention.
          key_mask: bool [B, S], False at padding keys. A row whose keys are all padding gets the
            mean of the values (finite, to be masked by the caller).
          mask: bool broadcastable to [B, heads, T, S], False where attention is forbidden.
          causal: forbid attending to later positions (self-attention only).

        Returns:
          [B, T, out_features] in `dtype`.
        """
        features = x.shape[-1]
        head_dim = self.head_dim or features // self.num_heads
        if head_dim * self.num_heads != features and self.head_dim is None:
            raise ValueError(f"width {features} is not divisible by {self.num_heads} heads; "
                             "set head_dim or change the width")
        context = x if context is None else context
        proj = lambda n, names, name: dense(n, names, use_bias=self.use_bias, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
        inner = self.num_heads * head_dim
        split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))
        source = self.context_axis or self.query_axis
        q = split(proj(inner, (self.query_axis, "heads"), "query")(x.astype(self.dtype)))
        k = split(proj(inner, (source, "heads"), "key")(context.astype(self.dtype)))
        v = split(proj(inner, (source, "heads"), "value")(context.astype(self.dtype)))
        y = jax.nn.dot_product_attention(q, k, v, mask=combine_masks(key_mask, mask),
                                         is_causal=causal, implementation=self.implementation)
        y = y.reshape(y.shape[:-2] + (inner,))
        return proj(self.out_features or features, ("heads", self.out_axis or self.query_axis),
                    "out")(y)


class Mlp(nn.Module):
    """Position-wise feed-forward: Dense -> GELU -> Dense (names `fc1`, `fc2`)."""

    hidden_features: int
    out_features: int | None = None
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Args: x: [..., D]. Returns: [..., out_features or D]."""
        out = self.out_features or x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden_features, ("embed", "mlp"), name="fc1", **kw)(x)
        h = nn.gelu(h)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
        return dense(out, ("mlp", "embed"), name="fc2", **kw)(h)


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, optional cross-attention, MLP, each as `x + f(LN(x))`.

    Attributes:
      num_heads: attention heads.
      mlp_ratio: MLP hidden width over the model width.
      dropout_rate: dropout on each residual branch (needs a `dropout` rng when training).
      cross_attention: add a cross-attention sub-block (`context` must then be given).
      causal: causal self-attention.
      attention_impl: "xla" or "cudnn" (`MultiHeadAttention.implementation`).
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0
    cross_attention: bool = False
    causal: bool = False
    attention_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 context: jax.Array | None = None, context_mask: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """One block.

        Args:
          x: [B, T, D].
          mask: bool [B, T], False at padding positions of `x` (masked as keys).
          context: [B, S, Dc] states to cross-attend to (cross_attention only).
          context_mask: bool [B, S], False at padding positions of `context`.
          train: enables dropout.

        Returns:
          [B, T, D]. Outputs at padding positions are finite but meaningless.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = lambda h: nn.Dropout(self.dropout_rate)(h, deterministic=not train)
        h = layer_norm("embed", name="ln_1", **kw)(x)
        x = x + drop(MultiHeadAttention(self.num_heads, implementation=self.attention_impl,
                                        name="attn", **kw)(
            h, key_mask=mask, causal=self.causal))
        if self.cross_attention:
            if context is None:
                raise ValueError("this block cross-attends: pass `context` (and context_mask)")
            h = layer_norm("embed", name="ln_cross", **kw)(x)
            x = x + drop(MultiHeadAttention(self.num_heads, context_axis="context",
                                            implementation=self.attention_impl,
                                            name="cross_attn", **kw)(
                h, context, key_mask=context_mask))
        h = layer_norm("embed", name="ln_2", **kw)(x)
        hidden = int(round(self.mlp_ratio * x.shape[-1]))
        return x + drop(Mlp(hidden, dropout_rate=self.dropout_rate, name="mlp", **kw)(h, train))


class Transformer(nn.Module):
    """A stack of pre-LN blocks (`block_{i}`) followed by a final LayerNorm (`ln_final`).

    Attributes:
      num_layers: number of blocks.
      num_heads, mlp_ratio, dropout_rate, cross_attention, causal, attention_impl: as in
        TransformerBlock.
      remat: recompute each block's activations in the backward pass (saves memory).
    """

    num_layers: int
    num_heads: int
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0
    cross_attention: bool = False
    causal: bool = False
    remat: bool = False
    attention_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 context: jax.Array | None = None, context_mask: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """Args: as TransformerBlock. Returns: [B, T, D] after the final LayerNorm."""
        # `train` is argument 5 counting self: static, so dropout's Python branch survives remat.
        block_cls = nn.remat(TransformerBlock, static_argnums=(5,)) if self.remat \
            else TransformerBlock
        for i in range(self.num_layers):
            x = block_cls(self.num_heads, self.mlp_ratio, self.dropout_rate,
                          self.cross_attention, self.causal, self.attention_impl,
                          dtype=self.dtype,
                          param_dtype=self.param_dtype, name=f"block_{i}")(
                x, mask, context, context_mask, train)
        return layer_norm("embed", name="ln_final", dtype=self.dtype,
                          param_dtype=self.param_dtype)(x)
