"""PyTorch peer of the 1-D latent diffusion U-Net of `ldm_jax.diffusion.unet`, and its train step.

The same network as `ldm_jax.diffusion.unet.UNet` (latent diffusion, Rombach et al. 2022, in 1-D
as in AudioLDM / MusicLDM), built from the same `model` config section with the same modules
under the same names, so that parameter counts agree layer by layer and `load_flax_params`
can copy a Flax parameter tree in to check that both compute the same function:

- sinusoidal timestep features (cosines first) through Linear-SiLU-Linear, plus a bias-free
  projection of the pooled text embedding;
- ResNet blocks: GroupNorm, SiLU, width-3 conv, scale-shift from the embedding, GroupNorm, SiLU,
  conv, with a Linear on the residual path when the width changes;
- transformer stages at `attention_levels` and in the middle: GroupNorm, Linear in, pre-LN
  blocks of self-attention, cross-attention to a learned null token plus the text states, and a
  tanh-GELU MLP, Linear out; attention by `torch.nn.functional.scaled_dot_product_attention`;
- stride-2 conv downsampling, nearest upsampling then a conv, skips from every down block.

Differences: frames must be a multiple of `2 ** (levels - 1)` (the Flax model also accepts other
lengths by padding and masking); dropout and rematerialisation are left out (the benchmark
presets use none of the first, and the second changes time, not shape).

The train step is that of `ldm_jax.diffusion.train.train_step` on random data: the v objective
with min-SNR-5 weights, 10% of captions dropped to the null condition, global-norm clipping at
1.0, AdamW and an EMA of the parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.peers.timing import time_step

EPS = 1e-6  # Flax's GroupNorm and LayerNorm epsilon


def _fields(model_cfg) -> dict:
    """The validated U-Net fields of a `model` config (errors as `make_unet` raises them)."""
    from ldm_jax.diffusion.unet import make_unet

    flax_unet = make_unet(model_cfg)
    names = ("latent_channels", "base_channels", "channel_mult", "num_res_blocks",
             "attention_levels", "num_heads", "head_dim", "transformer_depth", "mlp_ratio",
             "norm_groups", "context_dim", "pooled_dim")
    return {n: getattr(flax_unet, n) for n in names}


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv1d:
    return nn.Conv1d(c_in, c_out, 3, stride=stride, padding=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with scale-shift conditioning; x [B, C, T], emb [B, E]."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=EPS)
        self.conv1 = _conv(c_in, c_out)
        self.emb_proj = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=EPS)
        self.conv2 = _conv(c_out, c_out)
        self.skip = nn.Linear(c_in, c_out) if c_in != c_out else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        if self.skip is not None:
            x = self.skip(x.transpose(1, 2)).transpose(1, 2)
        return x + h


class Attention(nn.Module):
    """Multi-head attention with separate query/key/value/out projections (biases on all)."""

    def __init__(self, width: int, context_width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(context_width, width)
        self.value = nn.Linear(context_width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x, context=None, key_mask=None):
        """x [B, T, D]; context [B, S, Dc] or None; key_mask bool [B, S]. Returns [B, T, D]."""
        context = x if context is None else context
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        # Flax's nn.gelu defaults to the tanh approximation.
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention and MLP, each as a residual branch."""

    def __init__(self, width: int, context_dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=EPS)
        self.attn = Attention(width, width, heads)
        self.cross = context_dim > 0
        if self.cross:
            self.ln_cross = nn.LayerNorm(width, eps=EPS)
            self.cross_attn = Attention(width, context_dim, heads)
        self.ln_2 = nn.LayerNorm(width, eps=EPS)
        self.mlp = Mlp(width, int(round(mlp_ratio * width)))

    def forward(self, x, context, context_mask):
        x = x + self.attn(self.ln_1(x))
        if self.cross:
            x = x + self.cross_attn(self.ln_cross(x), context, context_mask)
        return x + self.mlp(self.ln_2(x))


class AttentionStage(nn.Module):
    """GroupNorm, Linear in, transformer blocks, Linear out, residual; x [B, C, T]."""

    def __init__(self, width: int, context_dim: int, heads: int, depth: int, mlp_ratio: float,
                 groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, width, eps=EPS)
        self.proj_in = nn.Linear(width, width)
        self.blocks = nn.ModuleDict({f"block_{i}": TransformerBlock(width, context_dim, heads,
                                                                    mlp_ratio)
                                     for i in range(depth)})
        self.proj_out = nn.Linear(width, width)

    def forward(self, x, context, context_mask):
        h = self.proj_in(self.norm(x).transpose(1, 2))
        for block in self.blocks.values():
            h = block(h, context, context_mask)
        return x + self.proj_out(h).transpose(1, 2)


class TimestepEmbedding(nn.Module):
    def __init__(self, features: int, frequency_dim: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.fc1 = nn.Linear(frequency_dim, features)
        self.fc2 = nn.Linear(features, features)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs
        x = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_dim % 2:
            x = F.pad(x, (0, 1))
        return self.fc2(F.silu(self.fc1(x)))


class UNet(nn.Module):
    """The U-Net of `ldm_jax.diffusion.unet.UNet`; modules are named as its parameters."""

    def __init__(self, latent_channels, base_channels, channel_mult, num_res_blocks,
                 attention_levels, num_heads, head_dim, transformer_depth, mlp_ratio,
                 norm_groups, context_dim, pooled_dim):
        super().__init__()
        self.levels = len(channel_mult)
        self.num_res_blocks = num_res_blocks
        self.attention_levels = tuple(attention_levels)
        self.context_dim, self.pooled_dim = context_dim, pooled_dim
        emb = 4 * base_channels
        heads = lambda c: c // head_dim if head_dim > 0 else num_heads
        stage = lambda c: AttentionStage(c, context_dim, heads(c), transformer_depth, mlp_ratio,
                                         norm_groups)
        m = {"time_embed": TimestepEmbedding(emb, base_channels)}
        if pooled_dim:
            m["pooled_proj"] = nn.Linear(pooled_dim, emb, bias=False)
        m["conv_in"] = _conv(latent_channels, base_channels)
        width, skips = base_channels, [base_channels]
        for level, mult in enumerate(channel_mult):
            for i in range(num_res_blocks):
                m[f"down_{level}_res_{i}"] = ResBlock(width, base_channels * mult, emb,
                                                      norm_groups)
                width = base_channels * mult
                if level in self.attention_levels:
                    m[f"down_{level}_attn_{i}"] = stage(width)
                skips.append(width)
            if level < self.levels - 1:
                m[f"down_{level}_downsample"] = _conv(width, width, stride=2)
                skips.append(width)
        m["mid_res_0"] = ResBlock(width, width, emb, norm_groups)
        m["mid_attn"] = stage(width)
        m["mid_res_1"] = ResBlock(width, width, emb, norm_groups)
        for level in reversed(range(self.levels)):
            for i in range(num_res_blocks + 1):
                out = base_channels * channel_mult[level]
                m[f"up_{level}_res_{i}"] = ResBlock(width + skips.pop(), out, emb, norm_groups)
                width = out
                if level in self.attention_levels:
                    m[f"up_{level}_attn_{i}"] = stage(width)
            if level > 0:
                m[f"up_{level}_upsample"] = _conv(width, width)
        m["norm_out"] = nn.GroupNorm(norm_groups, width, eps=EPS)
        m["conv_out"] = _conv(width, latent_channels)
        self.layers = nn.ModuleDict(m)
        if context_dim:
            self.null_context = nn.Parameter(0.02 * torch.randn(1, 1, context_dim))
        nn.init.zeros_(self.layers["conv_out"].weight)

    @property
    def frame_multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, x, t, context=None, context_mask=None, pooled=None):
        """Predicts the diffusion target.

        Args:
          x: noisy latents [B, T, latent_channels], T a multiple of `frame_multiple`.
          t: timesteps [B].
          context: text states [B, L, context_dim] or None.
          context_mask: bool [B, L] (True at real tokens) or None.
          pooled: pooled text embedding [B, pooled_dim] or None (zeros).

        Returns:
          [B, T, latent_channels].
        """
        if x.shape[1] % self.frame_multiple:
            raise ValueError(f"frames must be a multiple of {self.frame_multiple}, got "
                             f"{x.shape[1]}")
        L = self.layers
        batch = x.shape[0]
        emb = L["time_embed"](t)
        if self.pooled_dim and pooled is not None:
            emb = emb + L["pooled_proj"](pooled)
        keys = keys_mask = None
        if self.context_dim:
            null = self.null_context.to(x.dtype).expand(batch, 1, -1)
            if context is None:
                keys, keys_mask = null, torch.ones(batch, 1, dtype=torch.bool, device=x.device)
            else:
                if context_mask is None:
                    context_mask = torch.ones(context.shape[:2], dtype=torch.bool,
                                              device=x.device)
                keys = torch.cat([null, context.to(null.dtype)], dim=1)
                keys_mask = F.pad(context_mask.bool(), (1, 0), value=True)

        h = L["conv_in"](x.transpose(1, 2))
        skips = [h]
        for level in range(self.levels):
            for i in range(self.num_res_blocks):
                h = L[f"down_{level}_res_{i}"](h, emb)
                if level in self.attention_levels:
                    h = L[f"down_{level}_attn_{i}"](h, keys, keys_mask)
                skips.append(h)
            if level < self.levels - 1:
                h = L[f"down_{level}_downsample"](h)
                skips.append(h)
        h = L["mid_res_0"](h, emb)
        h = L["mid_attn"](h, keys, keys_mask)
        h = L["mid_res_1"](h, emb)
        for level in reversed(range(self.levels)):
            for i in range(self.num_res_blocks + 1):
                h = L[f"up_{level}_res_{i}"](torch.cat([h, skips.pop()], dim=1), emb)
                if level in self.attention_levels:
                    h = L[f"up_{level}_attn_{i}"](h, keys, keys_mask)
            if level > 0:
                h = L[f"up_{level}_upsample"](torch.repeat_interleave(h, 2, dim=2))
        h = L["conv_out"](F.silu(L["norm_out"](h)))
        return h.transpose(1, 2)


def build_unet(model_cfg) -> UNet:
    """The peer of `ldm_jax.diffusion.unet.make_unet(model_cfg)` (same config section)."""
    return UNet(**_fields(model_cfg))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_flax_params(model: UNet, params) -> None:
    """Copies a Flax U-Net parameter tree (`variables["params"]`) into the peer, in place.

    Dense kernels [in, out] become Linear weights [out, in]; conv kernels [k, in, out] become
    Conv1d weights [out, in, k]; norm `scale` becomes `weight`. Every peer parameter must be
    matched, or a KeyError names the first one that is not.
    """
    import numpy as np

    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict) or hasattr(v, "items"):
                walk(v, prefix + (k,))
            else:
                flat[prefix + (k,)] = np.asarray(v)

    walk(params, ())
    names = {}
    for path, value in flat.items():
        top, *rest = path
        if rest and rest[0].startswith("block_"):
            rest.insert(0, "blocks")
        if not rest:  # the null context token
            names[top] = value
            continue
        if rest[-1] == "kernel":
            value = value.transpose(2, 1, 0) if value.ndim == 3 else value.T
        rest[-1] = {"kernel": "weight", "scale": "weight"}.get(rest[-1], rest[-1])
        names[".".join(["layers", top, *rest])] = value
    state = model.state_dict()
    missing = sorted(set(state) - set(names))
    if missing:
        raise KeyError(f"no Flax parameter for {missing[0]}")
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(torch.from_numpy(np.array(names[name], np.float32)).reshape(tensor.shape))


# ----------------------------------------------------------------------------- training step

def _alphas_cumprod(device) -> torch.Tensor:
    from ldm_jax.diffusion.schedules import make_schedule

    return torch.as_tensor(make_schedule("scaled_linear", 1000).alphas_cumprod, device=device)


def make_train_step(model: UNet, dtype: str | torch.dtype = "float32", lr: float = 1e-4, *,
                    compile: bool = False, min_snr_gamma: float = 5.0, cond_drop: float = 0.1,
                    grad_clip: float = 1.0, ema_decay: float = 0.999):
    """One AdamW step of the v-objective diffusion loss, as `ldm_jax.diffusion.train.train_step`.

    Args:
      model: the peer U-Net, already on its device (parameters float32).
      dtype: compute dtype: "float32", or "bfloat16" for autocast (parameters stay float32).
      lr: AdamW learning rate (weight decay 0.01 as in the LDM presets).
      compile: wrap the forward and backward in `torch.compile`.
      min_snr_gamma, cond_drop, grad_clip, ema_decay: as in the LDM experiment configs.

    Returns:
      `step(batch) -> loss` (a 0-d tensor, not synchronised) with batch
      {"latents": [B, T, C], "context": [B, L, D], "context_mask": bool [B, L],
       "pooled": [B, E]}.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    abar = _alphas_cumprod(device)

    def loss_fn(batch):
        x0 = batch["latents"]
        b = x0.shape[0]
        t = torch.randint(0, abar.shape[0], (b,), device=device)
        a = abar[t][:, None, None]
        noise = torch.randn_like(x0)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        keep = torch.rand(b, device=device) >= cond_drop
        context = batch["context"] * keep[:, None, None]
        context_mask = batch["context_mask"] & keep[:, None]
        pooled = batch["pooled"] * keep[:, None]
        snr = abar[t] / (1 - abar[t])
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x_t, t, context, context_mask, pooled)
        per_example = (out.float() - target).square().mean(dim=(1, 2))
        return (weight * per_example).mean()

    def fwd_bwd(batch):
        loss = loss_fn(batch)
        loss.backward()
        return loss

    fwd_bwd_fn = torch.compile(fwd_bwd) if compile else fwd_bwd

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = fwd_bwd_fn(batch)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - ema_decay)
        return loss.detach()

    return step


def random_batch(model: UNet, batch: int, frames: int, context_len: int, device) -> dict:
    """Random latents [B, T, C], text states [B, L, D] with padded tails, pooled [B, E]."""
    g = torch.Generator(device="cpu").manual_seed(0)
    lengths = torch.randint(1, context_len + 1, (batch,), generator=g)
    layers = model.layers
    latent = layers["conv_in"].in_channels
    out = {"latents": torch.randn(batch, frames, latent, generator=g),
           "context": torch.randn(batch, context_len, max(model.context_dim, 1), generator=g),
           "context_mask": torch.arange(context_len)[None] < lengths[:, None],
           "pooled": torch.randn(batch, max(model.pooled_dim, 1), generator=g)}
    return {k: v.to(device) for k, v in out.items()}


def benchmark(model_cfg, batch: int, frames: int, context_len: int = 32, repeats: int = 10,
              device: str = "cpu", dtype: str = "float32", compile: bool = False) -> dict:
    """Times the peer train step.

    Args:
      model_cfg: the `model` section of an LDM experiment config.
      batch: examples per step B.
      frames: latent frames T (a multiple of 2 ** (levels - 1)).
      context_len: text tokens L.
      repeats: timed steps after the first.
      device: a torch device string ("cpu", "cuda").
      dtype: "float32" or "bfloat16" (autocast).
      compile: use `torch.compile`.

    Returns:
      {"params", "step_s" (median of `repeats`), "compile_s" (first step, including any
       compilation), "examples_per_s", "torch", "device", "dtype", "compile"}.
    """
    device = torch.device(device)
    model = build_unet(model_cfg).to(device)
    data = random_batch(model, batch, frames, context_len, device)
    step = make_train_step(model, dtype, compile=compile)
    first, median = time_step(step, data, device, repeats)
    return {"params": param_count(model), "step_s": median, "compile_s": first,
            "examples_per_s": batch / median, "torch": torch.__version__, "device": str(device),
            "dtype": str(dtype), "compile": bool(compile)}
