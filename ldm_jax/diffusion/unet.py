"""The 1-D latent diffusion U-Net: ResNet blocks, text cross-attention, skip connections.

Follows the denoiser of latent diffusion (Rombach et al., "High-Resolution Image Synthesis with
Latent Diffusion Models", 2022) as used for audio by AudioLDM (Liu et al., 2023) and MusicLDM
(Chen et al., 2023), with the 2-D convolutions replaced by 1-D ones over codec latent frames
(channels last, `[batch, frames, channels]`):

- a sinusoidal timestep embedding through a two-layer MLP (DDPM, Ho et al., 2020), to which a
  projection of the pooled text embedding is added;
- ResNet blocks (GroupNorm, SiLU, width-3 convolutions) conditioned by a scale and a shift
  computed from that embedding (FiLM, Perez et al., 2018; the scale-shift norm of Dhariwal &
  Nichol, 2021);
- at the levels named in the config, and always in the middle, a transformer stage (LDM's
  "spatial transformer"): GroupNorm, a projection in, pre-LN blocks of self-attention over frames,
  cross-attention to the text states and a GELU MLP, a projection out;
- strided-convolution downsampling, nearest-neighbour upsampling followed by a convolution, and
  skip connections from every down-path block to the up path;
- the last layer of every residual branch and the output convolution zero-initialised, so the
  network starts as the identity on its residual stream and outputs zeros.

Patches: with `patch_size` p > 1 the network runs on groups of p consecutive latent frames folded
into the channels (`[B, T, D] -> [B, T / p, p * D]`, as the patched transformers of DiT, Peebles &
Xie 2023, and the patched pretransforms of Stable Audio do), and unfolds its output back: p
times fewer frames at every level for the same convolution widths, which suits codecs with high
latent frame rates.

Lengths: the input is padded with zeros at the end to a multiple of `p * 2 ** (levels - 1)` and
the output cropped back. The padded frames are masked at every level: they are left out of the
GroupNorm statistics and of the self-attention keys, and zeroed before every convolution, so the
real frames see what a network without padding would show them (zeros past the end, as from a
convolution's own padding). A length that already divides adds no masking work.

Conditioning: cross-attention keys are a learned null token followed by the text states, under
`[True] + context_mask`. A caption that is entirely padding (dropped for classifier-free guidance,
or `context=None`) therefore attends to the null token alone: finite in value and gradient, and
identical to `context=None`. `pooled=None` equals a zero pooled embedding (its projection has no
bias). With `context_pooling="attention"` a learned query also attends over those keys and its
output joins the timestep embedding (Imagen's attention pooling, Saharia et al., 2022), so every
ResNet block is conditioned on the whole caption, not only the attention stages.

Sharding: traced under `jax.set_mesh(mesh)`, block outputs and skip concatenations are pinned to
the batch axes of `ldm_jax.parallel`, so FSDP-sharded kernels are gathered instead of the
activations being resharded; outside a mesh context nothing changes.

Sizes (`param_count`, counted with `jax.eval_shape`):
  `experiments/ldm_tiny.py`: 2,545,808 parameters (base width 64, multipliers (1, 2)).
  `experiments/ldm_base.py`: 188,949,952 parameters (base width 192, multipliers (1, 2, 3, 4),
  two ResNet blocks per level, attention at levels 1-3 and in the middle, 64-wide heads).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ldm_jax.axes import BATCH_AXES
from ldm_jax.config import Section
from ldm_jax.diffusion.schedules import DiffusionError
from ldm_jax.nn.attention import (
    ATTENTION_IMPLS,
    MultiHeadAttention,
    TransformerBlock,
    check_attention_impl,
)
from ldm_jax.nn.embeddings import TimestepEmbedding
from ldm_jax.nn.layers import conv, dense, group_norm, named

Dtype = Any

# Policies of jax.checkpoint_policies that take no arguments, from most to least recomputation.
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable",
                  "everything_saveable")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class UNetConfig(Section):
    """The `model` section of an LDM experiment: the U-Net's shape (see the module docstring)."""

    LABEL: ClassVar[str] = "U-Net config"
    ERROR: ClassVar[type[Exception]] = DiffusionError

    latent_channels: int = 16  # must equal the codec's latent_dim
    patch_size: int = 1  # latent frames folded into the channels of one U-Net frame
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (1,)  # indices into channel_mult with a transformer stage
    num_heads: int = 4
    head_dim: int = 0  # > 0: heads = channels // head_dim at every level, instead of num_heads
    transformer_depth: int = 1
    mlp_ratio: int = 4
    norm_groups: int = 32
    context_dim: int = 128  # width of the text states; 0 builds no cross-attention
    pooled_dim: int = 128  # width of the pooled text embedding; 0 builds no projection
    context_pooling: str = "none"  # "attention": a pooled context joins the time embedding
    dropout: float = 0.0
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # one of REMAT_POLICIES
    attention_impl: str = "xla"  # or "cudnn" (NVIDIA GPUs, bfloat16/float16): nn.attention
    dtype: str = "float32"  # compute dtype; parameters are always float32

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise DiffusionError(f"model.dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not self.channel_mult:
            raise DiffusionError("model.channel_mult needs at least one level")
        if self.patch_size < 1:
            raise DiffusionError(f"model.patch_size must be at least 1, got {self.patch_size}")
        if self.num_res_blocks < 1:
            raise DiffusionError("model.num_res_blocks must be at least 1")
        bad = [a for a in self.attention_levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            raise DiffusionError(f"model.attention_levels {bad} are not levels of channel_mult "
                                 f"(0..{len(self.channel_mult) - 1})")
        if self.base_channels % self.norm_groups:
            raise DiffusionError(f"model.base_channels={self.base_channels} must be a multiple "
                                 f"of model.norm_groups={self.norm_groups}")
        for mult in self.channel_mult:
            width = self.base_channels * mult
            heads = width // self.head_dim if self.head_dim > 0 else self.num_heads
            if heads < 1 or width % heads:
                raise DiffusionError(f"{width} channels do not split into attention heads; "
                                     "change model.num_heads or model.head_dim")
        if self.context_pooling not in ("none", "attention"):
            raise DiffusionError(f"model.context_pooling {self.context_pooling!r}: use 'none' "
                                 "or 'attention'")
        if self.context_pooling == "attention" and not self.context_dim:
            raise DiffusionError("model.context_pooling='attention' pools the text states: set "
                                 "model.context_dim")
        if self.remat_policy not in REMAT_POLICIES:
            raise DiffusionError(f"model.remat_policy {self.remat_policy!r} is not one of "
                                 f"{', '.join(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise DiffusionError(f"model.attention_impl {self.attention_impl!r} is not one of "
                                 f"{', '.join(ATTENTION_IMPLS)}")


@dataclasses.dataclass(frozen=True)
class _Pass:
    """One forward pass's shared pieces (`UNet._begin`): sizes, the valid-frame mask of each
    level, and `res(features, name)(h, mask)` / `stage(h, level, name)` that build its blocks
    conditioned on the pass's embedding and text keys."""

    batch: int
    frames: int
    padded: int
    masks: list
    res: Callable
    stage: Callable
    kw: dict


def _pin_batch(h: jax.Array) -> jax.Array:
    """Keeps activations sharded over the batch axes when tracing under `jax.set_mesh`.

    Without it GSPMD may carry the FSDP sharding of a kernel's feature axis into the activations
    and reshard them at every skip connection. Outside a mesh context, or for a batch that the
    batch axes do not divide, this is the identity.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return h
    if h.shape[0] % math.prod(mesh.shape[a] for a in BATCH_AXES):
        return h
    return jax.lax.with_sharding_constraint(h, P(BATCH_AXES, *([None] * (h.ndim - 1))))


def _zero_invalid(h: jax.Array, mask: jax.Array | None) -> jax.Array:
    return h if mask is None else jnp.where(mask[..., None], h, jnp.zeros((), h.dtype))


def _group_norm(name: str, groups: int, x: jax.Array, mask: jax.Array | None, **kw) -> jax.Array:
    """GroupNorm over time and channel groups; statistics over the valid frames only."""
    if mask is not None:
        mask = jnp.broadcast_to(mask[..., None], (1,) + x.shape[1:])
    return group_norm(groups, "conv_out", name=name, **kw)(x, mask=mask)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, scale-shift conditioned on `emb`, plus a residual path.

    Attributes:
      features: output channels.
      groups: GroupNorm groups.
      dropout: dropout rate before the second convolution.
      deterministic: no dropout (inference).
    """

    features: int
    groups: int
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Args: x [B, T, C_in]; emb [B, E]; mask None or bool [1, T]. Returns [B, T, features]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _zero_invalid(nn.silu(_group_norm("norm1", self.groups, x, mask, **kw)), mask)
        h = conv(self.features, (3,), padding=1, name="conv1", **kw)(h)
        # Split on its input features only: split on its outputs, GSPMD would split the scales
        # and shifts and gather the batch of the activations they modulate.
        film = dense(2 * self.features, ("cond_in", None), name="emb_proj", **kw)(nn.silu(emb))
        scale, shift = jnp.split(film[:, None, :], 2, axis=-1)
        h = _group_norm("norm2", self.groups, h, mask, **kw) * (1 + scale) + shift
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(nn.silu(h))
        h = conv(self.features, (3,), padding=1, kernel_init=nn.initializers.zeros,
                 name="conv2", **kw)(_zero_invalid(h, mask))
        if x.shape[-1] != self.features:
            x = dense(self.features, ("conv_in", "conv_out"), name="skip", **kw)(x)
        return _zero_invalid(x + h, mask)


class AttentionStage(nn.Module):
    """GroupNorm, projection in, `depth` transformer blocks, zero-initialised projection out.

    Attributes:
      num_heads: attention heads.
      depth: transformer blocks.
      mlp_ratio: MLP hidden width over the channels.
      cross: cross-attend to the context.
      groups: GroupNorm groups.
      dropout: dropout on each residual branch of the blocks.
      deterministic: no dropout (inference).
    """

    num_heads: int
    depth: int = 1
    mlp_ratio: int = 4
    cross: bool = True
    groups: int = 32
    dropout: float = 0.0
    deterministic: bool = True
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, context, context_mask):
        """Args: x [B, T, C]; mask None or bool [1, T]; context [B, S, D] and context_mask bool
        [B, S] (None without cross-attention). Returns [B, T, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        h = _group_norm("norm", self.groups, x, mask, **kw)
        h = dense(width, ("conv_in", "embed"), name="proj_in", **kw)(h)
        for i in range(self.depth):
            h = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout, self.cross,
                                 attention_impl=self.attention_impl, name=f"block_{i}",
                                 **kw)(h, mask, context, context_mask,
                                                         not self.deterministic)
        h = dense(width, ("embed", "conv_out"), kernel_init=nn.initializers.zeros,
                  name="proj_out", **kw)(h)
        return _zero_invalid(x + h, mask)


class UNet(nn.Module):
    """The 1-D U-Net denoiser over codec latents (see the module docstring).

    Attributes: the fields of `UNetConfig` (dtype as a jnp dtype), and `param_dtype`.
    """

    latent_channels: int
    patch_size: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[int, ...]
    num_heads: int
    head_dim: int
    transformer_depth: int
    mlp_ratio: int
    norm_groups: int
    context_dim: int
    pooled_dim: int
    context_pooling: str
    dropout: float
    remat: bool
    remat_policy: str
    dtype: Dtype
    attention_impl: str = "xla"
    param_dtype: Dtype = jnp.float32

    @property
    def frame_multiple(self) -> int:
        """Frame counts that need no internal padding are multiples of this."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    def _heads(self, channels: int) -> int:
        return channels // self.head_dim if self.head_dim > 0 else self.num_heads

    def _check_inputs(self, x, t, context, context_mask, pooled):
        if x.ndim != 3 or x.shape[-1] != self.latent_channels:
            raise DiffusionError(f"the U-Net takes latents [batch, frames, "
                                 f"{self.latent_channels}], got shape {tuple(x.shape)}; "
                                 "model.latent_channels must equal the codec's latent_dim")
        batch = x.shape[0]
        if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and jnp.shape(t)[0] != batch):
            raise DiffusionError(f"timesteps must be a scalar or [{batch}], got shape "
                                 f"{tuple(jnp.shape(t))}")
        if context is not None:
            if self.context_dim == 0:
                raise DiffusionError("this U-Net has no cross-attention (model.context_dim=0); "
                                     "pass context=None or set model.context_dim")
            if context.ndim != 3 or context.shape[0] != batch or \
                    context.shape[-1] != self.context_dim:
                raise DiffusionError(f"context must be [{batch}, length, {self.context_dim}], got "
                                     f"{tuple(context.shape)}; set model.context_dim to the "
                                     "text width")
            if context_mask is not None and tuple(context_mask.shape) != context.shape[:2]:
                raise DiffusionError(f"context_mask must be {tuple(context.shape[:2])}, got "
                                     f"{tuple(context_mask.shape)}")
        if pooled is not None and (self.pooled_dim == 0 or
                                   tuple(pooled.shape) != (batch, self.pooled_dim)):
            raise DiffusionError(f"pooled must be [{batch}, {self.pooled_dim}], got "
                                 f"{tuple(pooled.shape)}; set model.pooled_dim to its width "
                                 "(0 disables it)")

    def _context(self, batch: int, context, context_mask):
        """Prepends the learned null token: keys [B, 1 + L, D] and mask [B, 1 + L]."""
        null = self.param("null_context", named(nn.initializers.normal(0.02),
                                                (None, None, "context")),
                          (1, 1, self.context_dim), self.param_dtype)
        null = null.astype(self.dtype)
        if context is None:
            return jnp.broadcast_to(null, (batch, 1, self.context_dim)), jnp.ones((batch, 1), bool)
        if context_mask is None:
            context_mask = jnp.ones(context.shape[:2], bool)
        keys = jnp.concatenate([jnp.broadcast_to(null, (batch, 1, self.context_dim)),
                                context.astype(self.dtype)], axis=1)
        return keys, jnp.pad(context_mask.astype(bool), ((0, 0), (1, 0)), constant_values=True)

    def _begin(self, x, t, context, context_mask, pooled, train) -> _Pass:
        """What every part of a pass reads: the masks of each level, the conditioning embedding,
        the cross-attention keys and the block constructors (`_Pass`)."""
        self._check_inputs(x, t, context, context_mask, pooled)
        batch, frames, _ = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.channel_mult)
        padded = -(-frames // self.frame_multiple) * self.frame_multiple
        p = self.patch_size
        masks, valid = [], -(-frames // p)
        for level in range(levels):
            length = padded // p // 2**level
            masks.append(None if padded == frames else (jnp.arange(length) < valid)[None])
            valid = -(-valid // 2)

        res_cls, stage_cls = ResBlock, AttentionStage
        if self.remat:
            policy = getattr(jax.checkpoint_policies, self.remat_policy)
            res_cls = nn.remat(ResBlock, policy=policy)
            stage_cls = nn.remat(AttentionStage, policy=policy)

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        emb = TimestepEmbedding(4 * self.base_channels, frequency_dim=self.base_channels,
                                name="time_embed", **kw)(t)
        if self.pooled_dim:
            if pooled is None:
                pooled = jnp.zeros((batch, self.pooled_dim), self.dtype)
            emb = emb + dense(emb.shape[-1], ("cond_embed", "cond_embed"), use_bias=False,
                              name="pooled_proj", **kw)(pooled.astype(self.dtype))
        keys, keys_mask = (self._context(batch, context, context_mask) if self.context_dim
                           else (None, None))
        if self.context_pooling == "attention":
            query = self.param("context_pool_query", named(nn.initializers.normal(1.0),
                                                           (None, None, "context")),
                               (1, 1, self.context_dim), self.param_dtype)
            emb = emb + MultiHeadAttention(self.num_heads, out_features=emb.shape[-1],
                                           query_axis="context", out_axis="cond_embed",
                                           implementation=self.attention_impl,
                                           name="context_pool", **kw)(
                jnp.broadcast_to(query, (batch, 1, self.context_dim)).astype(self.dtype), keys,
                key_mask=keys_mask)[:, 0]
        # The embedding is small: left free, GSPMD shards its features like the FSDP kernels
        # around it and all-gathers the batch of every ResBlock's conditioning instead.
        emb = _pin_batch(emb)

        def res(features, name):
            block = res_cls(features, self.norm_groups, self.dropout, not train, name=name, **kw)
            return lambda h, mask: _pin_batch(block(h, emb, mask))

        def stage(h, level, name):
            mod = stage_cls(self._heads(h.shape[-1]), self.transformer_depth, self.mlp_ratio,
                            self.context_dim > 0, self.norm_groups, self.dropout, not train,
                            self.attention_impl, name=name, **kw)
            return _pin_batch(mod(h, masks[level], keys, keys_mask))

        return _Pass(batch=batch, frames=frames, padded=padded, masks=masks, res=res,
                     stage=stage, kw=kw)

    def _fold(self, run: _Pass, x: jax.Array) -> jax.Array:
        """[B, T, C] -> [B, padded / p, p * C]: zero-padded at the end, patches in channels."""
        h = jnp.pad(x.astype(self.dtype), ((0, 0), (0, run.padded - run.frames), (0, 0)))
        return h.reshape(run.batch, run.padded // self.patch_size,
                         self.patch_size * x.shape[-1])

    def _encode(self, run: _Pass, x: jax.Array, hint: Callable | None = None):
        """The input block, down path and middle: (middle output, skip outputs). `hint` maps
        the input block's output to what is added to it (a ControlNet's control encoder)."""
        h = conv(self.base_channels, (3,), padding=1, name="conv_in",
                 **run.kw)(self._fold(run, x))
        if hint is not None:
            h = h + hint(h)
        skips = [h]
        levels = len(self.channel_mult)
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = run.res(self.base_channels * mult, f"down_{level}_res_{i}")(h, run.masks[level])
                if level in self.attention_levels:
                    h = run.stage(h, level, f"down_{level}_attn_{i}")
                skips.append(h)
            if level < levels - 1:
                h = conv(h.shape[-1], (3,), strides=2, padding=1,
                         name=f"down_{level}_downsample", **run.kw)(h)
                h = _zero_invalid(h, run.masks[level + 1])
                skips.append(h)
        h = run.res(h.shape[-1], "mid_res_0")(h, run.masks[-1])
        h = run.stage(h, levels - 1, "mid_attn")
        h = run.res(h.shape[-1], "mid_res_1")(h, run.masks[-1])
        return h, skips

    def skip_levels(self) -> list[int]:
        """The level of each skip output of the down path, in order (the last is the middle's
        input level); `residuals` follow this order."""
        out = [0]
        for level in range(len(self.channel_mult)):
            out += [level] * self.num_res_blocks
            if level < len(self.channel_mult) - 1:
                out.append(level + 1)
        return out

    @nn.compact
    def __call__(self, x, t, context=None, context_mask=None, pooled=None, *, train=False,
                 residuals=None):
        """Predicts the diffusion target for noisy latents.

        Args:
          x: noisy latents [B, T, latent_channels]; any T >= 1.
          t: timesteps [B] or a scalar, integer or float (continuous times are fine).
          context: text states [B, L, context_dim], or None (unconditional).
          context_mask: bool [B, L], True at real tokens; None means all real.
          pooled: pooled text embedding [B, pooled_dim], or None (a zero embedding).
          train: enables dropout (needs a `dropout` rng when model.dropout > 0).
          residuals: None, or `(skips, middle)` from a ControlNet (`diffusion.controlnet`):
            one array per skip output (shapes as `skip_levels` says) added to it before the up
            path reads it, and one added to the middle block's output.

        Returns:
          `(out, aux)`: out [B, T, latent_channels] in x's dtype; aux an empty dict.
        """
        run = self._begin(x, t, context, context_mask, pooled, train)
        masks, kw, levels = run.masks, run.kw, len(self.channel_mult)
        h, skips = self._encode(run, x)
        if residuals is not None:
            extra, middle = residuals
            if len(extra) != len(skips):
                raise DiffusionError(f"{len(extra)} skip residuals for {len(skips)} skip "
                                     "outputs: the ControlNet was built for another U-Net")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, extra)]
            h = h + middle.astype(h.dtype)

        for level in reversed(range(levels)):
            for i in range(self.num_res_blocks + 1):
                h = _pin_batch(jnp.concatenate([h, skips.pop()], axis=-1))
                h = run.res(self.base_channels * self.channel_mult[level],
                            f"up_{level}_res_{i}")(h, masks[level])
                if level in self.attention_levels:
                    h = run.stage(h, level, f"up_{level}_attn_{i}")
            if level > 0:
                h = _zero_invalid(jnp.repeat(h, 2, axis=1), masks[level - 1])
                h = conv(h.shape[-1], (3,), padding=1, name=f"up_{level}_upsample", **kw)(h)
                h = _zero_invalid(h, masks[level - 1])

        h = _zero_invalid(nn.silu(_group_norm("norm_out", self.norm_groups, h, masks[0], **kw)),
                          masks[0])
        h = conv(self.patch_size * self.latent_channels, (3,), padding=1,
                 kernel_init=nn.initializers.zeros, name="conv_out", **kw)(h)
        h = h.reshape(run.batch, run.padded, self.latent_channels)
        return h[:, :run.frames].astype(x.dtype), {}


# The U-Nets of the embedded experiments: `ldm_tiny` (the defaults) and `ldm_base`, in the range
# of the 2-D U-Nets of AudioLDM and MusicLDM (188,949,952 parameters).
PRESETS: dict[str, UNetConfig] = {
    "ldm_tiny": UNetConfig(),
    "ldm_base": UNetConfig(
        latent_channels=64, base_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
        attention_levels=(1, 2, 3), num_heads=8, head_dim=64, context_dim=768, pooled_dim=512,
        remat=True, remat_policy="dots_with_no_batch_dims_saveable", dtype="bfloat16"),
}


def make_unet(config: UNetConfig | Mapping[str, Any]) -> UNet:
    """Builds the U-Net from its config.

    Args:
      config: a `UNetConfig`, or a ConfigDict / mapping of its fields (the `model` section;
        missing fields take their defaults).

    Returns:
      An unbound `UNet` (float32 parameters, compute dtype from `config.dtype`).

    Raises:
      DiffusionError: for an unknown key or a value that does not fit (the message says which).
      ConfigError: `attention_impl` that this platform or dtype cannot run.
    """
    fields = UNetConfig.from_dict(config).to_dict()
    fields["channel_mult"] = tuple(fields["channel_mult"])
    fields["attention_levels"] = tuple(fields["attention_levels"])
    fields["dtype"] = DTYPES[fields["dtype"]]
    check_attention_impl(fields["attention_impl"], fields["dtype"])
    return UNet(**fields)


make_model = make_unet


def example_inputs(model: UNet, batch: int = 1, frames: int | None = None,
                   context_length: int = 1) -> dict[str, jax.Array]:
    """Zero inputs of the right shapes, e.g. for `model.init(rng, **example_inputs(model))`.

    Args:
      model: the U-Net.
      batch: batch size B.
      frames: latent frames T (default: the smallest length that needs no padding).
      context_length: text tokens L.

    Returns:
      dict with x [B, T, latent_channels], t [B], and context [B, L, context_dim],
      context_mask [B, L], pooled [B, pooled_dim] where the model takes them.
    """
    inputs = dict(x=jnp.zeros((batch, frames or model.frame_multiple, model.latent_channels)),
                  t=jnp.zeros((batch,), jnp.int32))
    if model.context_dim:
        inputs["context"] = jnp.zeros((batch, context_length, model.context_dim))
        inputs["context_mask"] = jnp.ones((batch, context_length), bool)
    if model.pooled_dim:
        inputs["pooled"] = jnp.zeros((batch, model.pooled_dim))
    return inputs


def init_variables(model: UNet, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Fresh variables `{"params": ...}` of the U-Net.

    With `boxed`, each array stays in the `nn.LogicallyPartitioned` box that names its axes
    (what `ldm_jax.parallel.tree_shardings` reads); otherwise plain arrays.
    """
    variables = model.init(rng, **example_inputs(model))
    return variables if boxed else nn.meta.unbox(variables)


def param_count(cfg) -> int:
    """Parameters of the U-Net a config describes, counted without allocating them.

    Args:
      cfg: a full experiment config (its `model` section is used) or the `model` section itself.

    Returns:
      The number of scalar parameters.
    """
    model = make_unet(cfg.model if "model" in cfg else cfg)
    shapes = jax.eval_shape(lambda rng: model.init(rng, **example_inputs(model)),
                            jax.random.PRNGKey(0))
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes)))
