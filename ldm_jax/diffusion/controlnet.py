"""Music ControlNet: time-varying melody, dynamics and rhythm controls on the trained latent U-Net.

Music ControlNet (Wu, Donahue, Watanabe, Bryan, TASLP 2024) adds time-varying controls to a
trained text-to-music diffusion model with a ControlNet (Zhang, Rao & Agrawala, 2023):

- a trainable copy of the U-Net's input block, down path and middle block (`ControlNet` is a
  `UNet` that runs only that part), initialised from the trained U-Net's (EMA) parameters; the
  U-Net itself stays frozen;
- a control encoder after the copy's input block: for each control, its values (zero where
  masked) and its mask through width-3 convolutions with SiLU, the controls' features summed,
  then a zero-initialised convolution to the U-Net's base width;
- a zero-initialised 1x1 convolution on every skip output of the copy and on its middle output;
  their outputs, times a per-call control scale, are added to the frozen U-Net's skip inputs and
  middle output (`UNet.__call__`'s `residuals`). At initialisation every residual is zero, so
  the controlled model is exactly the base model whatever the control.

Controls (all at the codec's latent frame rate, from `ldm_jax.controls`): `melody` the 12-bin
one-hot chroma of the high-passed signal (zero where unvoiced), `dynamics` the smoothed dB curve
(centred by its mean over the given frames inside the model and divided by 10 dB, so a curve in
any reference level means the same), `rhythm` the beat and downbeat activations. Each control has
a mask over frames; a control absent or outside its time range has mask 0, so any subset of the
controls over any time ranges is one input. Training draws the masks per example (Music
ControlNet's strategy, `ControlMaskConfig`): each control dropped whole with probability `drop`,
otherwise with probability `span_prob` a random span of up to `span_max` of the clip masked out.

Training (`diffusion.controlnet_train`, `ldm-jax train controlnet`, the chain's `controlnet`
stage) is the LDM's diffusion loss through the controlled model, with the LDM's text dropout for
classifier-free guidance; the frozen U-Net's parameters stay outside the optimiser state.
Generation adds the residuals to both halves of the guided batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import paths
from ldm_jax.config import Section
from ldm_jax.diffusion.schedules import DiffusionError
from ldm_jax.diffusion.unet import (
    DTYPES,
    UNet,
    UNetConfig,
    _zero_invalid,
    example_inputs,
    make_unet,
)
from ldm_jax.nn.attention import check_attention_impl
from ldm_jax.nn.layers import conv, dense

# The controls a ControlNet can take, and the channels of each.
CONTROLS: dict[str, int] = {"melody": 12, "dynamics": 1, "rhythm": 2}
DYNAMICS_UNIT_DB = 10.0  # the centred dynamics curve is divided by this


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """The ControlNet's `model` section: the U-Net's shape (copied from the trained U-Net at
    training time) and the controls.

    Attributes (beyond `UNetConfig`'s):
      controls: the controls it is trained on, in the order of their channels.
      encoder_channels: widths of each control's convolutions in the control encoder.
    """

    LABEL: ClassVar[str] = "ControlNet config"

    controls: tuple[str, ...] = tuple(CONTROLS)
    encoder_channels: tuple[int, ...] = (32, 64)

    def __post_init__(self):
        super().__post_init__()
        unknown = [c for c in self.controls if c not in CONTROLS]
        if not self.controls or unknown or len(set(self.controls)) != len(self.controls):
            raise DiffusionError(f"model.controls {list(self.controls)}: give distinct names "
                                 f"from {', '.join(CONTROLS)}")
        if not self.encoder_channels or min(self.encoder_channels) < 1:
            raise DiffusionError("model.encoder_channels must be positive widths")

    @property
    def control_channels(self) -> int:
        return sum(CONTROLS[c] for c in self.controls)


@dataclasses.dataclass(frozen=True)
class ControlMaskConfig(Section):
    """The `masks` section: how training hides controls (Music ControlNet's masking)."""

    SECTION: ClassVar[str] = "masks"
    LABEL: ClassVar[str] = "control mask config"
    ERROR: ClassVar[type[Exception]] = DiffusionError

    drop: float = 0.3  # probability that a control is absent from an example
    span_prob: float = 0.5  # probability that a present control is masked over one random span
    span_max: float = 0.8  # the longest masked span, as a share of the clip

    def __post_init__(self):
        for name in ("drop", "span_prob", "span_max"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DiffusionError(f"masks.{name}={getattr(self, name)} must be in [0, 1]")


class ControlNet(UNet):
    """The trainable encoder copy with the control encoder and the zero convolutions.

    Attributes: the U-Net's, and `controls`, `encoder_channels` (`ControlNetConfig`).
    """

    controls: tuple[str, ...] = tuple(CONTROLS)
    encoder_channels: tuple[int, ...] = (32, 64)

    @property
    def control_channels(self) -> int:
        return sum(CONTROLS[c] for c in self.controls)

    def _check_controls(self, x, controls, control_mask):
        want = (x.shape[0], x.shape[1])
        if controls is None or control_mask is None:
            raise DiffusionError("a ControlNet needs controls and control_mask")
        if tuple(controls.shape) != (*want, self.control_channels):
            raise DiffusionError(f"controls must be [{want[0]}, {want[1]}, "
                                 f"{self.control_channels}] ({', '.join(self.controls)}), got "
                                 f"{tuple(controls.shape)}")
        if tuple(control_mask.shape) != (*want, len(self.controls)):
            raise DiffusionError(f"control_mask must be [{want[0]}, {want[1]}, "
                                 f"{len(self.controls)}], got {tuple(control_mask.shape)}")

    @nn.compact
    def __call__(self, x, t, context=None, context_mask=None, pooled=None, controls=None,
                 control_mask=None, *, scale=1.0, train=False):
        """The residuals for the U-Net from noisy latents, their conditions and the controls.

        Args:
          x, t, context, context_mask, pooled: as `UNet.__call__`.
          controls: float [B, T, control_channels], the controls' channels in `controls` order.
          control_mask: [B, T, len(controls)] in [0, 1]: where each control is given.
          scale: the control scale, a scalar or [B] (0 gives the base model).
          train: enables dropout.

        Returns:
          `(skips, middle)` for `UNet.__call__(..., residuals=...)`.
        """
        self._check_controls(x, controls, control_mask)
        run = self._begin(x, t, context, context_mask, pooled, train)
        kw = run.kw
        mask = control_mask.astype(jnp.float32)
        values = controls.astype(jnp.float32)

        def hint(h):
            total, offset = 0.0, 0
            for k, name in enumerate(self.controls):
                m = mask[..., k:k + 1]
                v = values[..., offset:offset + CONTROLS[name]]
                offset += CONTROLS[name]
                if name == "dynamics":  # relative level: centred over the given frames
                    mean = jnp.sum(v * m, axis=1, keepdims=True) / jnp.maximum(
                        jnp.sum(m, axis=1, keepdims=True), 1.0)
                    v = (v - mean) / DYNAMICS_UNIT_DB
                g = self._fold(run, jnp.concatenate([v * m, m], axis=-1))
                for j, width in enumerate(self.encoder_channels):
                    g = _zero_invalid(nn.silu(conv(width, (3,), padding=1,
                                                   name=f"control_{name}_{j}", **kw)(g)),
                                      run.masks[0])
                total = total + g
            out = conv(h.shape[-1], (3,), padding=1, kernel_init=nn.initializers.zeros,
                       name="control_out", **kw)(total)
            return _zero_invalid(out, run.masks[0])

        h, skips = self._encode(run, x, hint)
        scale = jnp.asarray(scale, jnp.float32)
        scale = scale.reshape(-1, 1, 1) if scale.ndim == 1 else scale

        def zero(y, level, name):
            out = dense(y.shape[-1], ("conv_in", "conv_out"), kernel_init=nn.initializers.zeros,
                        name=name, **kw)(y)
            return _zero_invalid(out * scale.astype(out.dtype), run.masks[level])

        levels = self.skip_levels()
        residuals = [zero(s, levels[i], f"zero_skip_{i}") for i, s in enumerate(skips)]
        return residuals, zero(h, len(self.channel_mult) - 1, "zero_mid")


def make_controlnet(config: ControlNetConfig | Mapping[str, Any]) -> ControlNet:
    """Builds the ControlNet from its config (`ControlNetConfig` or a mapping of its fields)."""
    fields = ControlNetConfig.from_dict(config).to_dict()
    for name in ("channel_mult", "attention_levels", "controls", "encoder_channels"):
        fields[name] = tuple(fields[name])
    fields["dtype"] = DTYPES[fields["dtype"]]
    check_attention_impl(fields["attention_impl"], fields["dtype"])
    return ControlNet(**fields)


make_model = make_controlnet


def controlnet_config(base_model: Mapping, control_model: Mapping) -> ControlNetConfig:
    """The ControlNet config of a trained U-Net's `model` section and the ControlNet's own
    fields (`controls`, `encoder_channels`, and only those)."""
    unet_fields = UNetConfig.from_dict(base_model).to_dict()
    own = dict(control_model or {})
    shared = [k for k in own if k in unet_fields]
    if shared:
        raise DiffusionError(f"controlnet.model sets {', '.join(shared)}: the ControlNet copies "
                             "the trained U-Net's shape; give only controls and encoder_channels")
    return ControlNetConfig.from_dict({**unet_fields, **own})


def init_params(model: ControlNet, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Fresh ControlNet parameters (boxed with their logical axes if `boxed`)."""
    inputs = example_inputs(model)
    frames = inputs["x"].shape[1]
    variables = model.init(rng, **inputs,
                           controls=jnp.zeros((1, frames, model.control_channels)),
                           control_mask=jnp.zeros((1, frames, len(model.controls))))
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)


def copied_from_base(params: Mapping, base: Mapping) -> dict:
    """The subtrees of ControlNet PARAMS that are copies of the U-Net's (same names), taken
    from BASE: the input block, down path, middle and conditioning embeddings."""
    return {k: base[k] for k in params if k in base}


def apply_controlled(unet: UNet, base_params, controlnet: ControlNet, params, x, t, context,
                     context_mask, pooled, controls, control_mask, *, scale=1.0, train=False,
                     rngs=None) -> jax.Array:
    """The frozen U-Net's prediction with the ControlNet's residuals added."""
    residuals = controlnet.apply({"params": params}, x, t, context, context_mask, pooled,
                                 controls, control_mask, scale=scale, train=train, rngs=rngs)
    out, _ = unet.apply({"params": base_params}, x, t, context, context_mask, pooled,
                        train=train, rngs=rngs, residuals=residuals)
    return out


# ----------------------------------------------------------------------------- control inputs

def control_frames(found: Mapping, names: Sequence[str], num_frames: int) -> np.ndarray:
    """The channels of the controls NAMES of one clip, float32 [num_frames, channels].

    Args:
      found: controls in the form of `ldm_jax.controls` (`controls_from_audio`,
        `controls_from_midi`, ...): "melody" {"one_hot"}, "dynamics" {"db"}, "rhythm"
        {"beat_activation", "downbeat_activation"}; a missing one gives zeros.
      names: the controls, in channel order.
      num_frames: frames to return (cut or zero-padded at the end).
    """
    parts = []
    for name in names:
        if name not in found:
            parts.append(np.zeros((num_frames, CONTROLS[name]), np.float32))
            continue
        c = found[name]
        if name == "melody":
            x = np.asarray(c["one_hot"], np.float32)
        elif name == "dynamics":
            x = np.asarray(c["db"], np.float32)[:, None]
        else:
            x = np.stack([np.asarray(c["beat_activation"], np.float32),
                          np.asarray(c["downbeat_activation"], np.float32)], axis=-1)
        x = x[:num_frames]
        parts.append(np.pad(x, [(0, num_frames - x.shape[0]), (0, 0)]))
    return np.concatenate(parts, axis=-1)


def _per_prompt(controls, n: int) -> list[Mapping]:
    items = [controls] * n if isinstance(controls, Mapping) else list(controls)
    if len(items) != n:
        raise DiffusionError(f"{len(items)} sets of controls for {n} prompts; give one for all "
                             "or one per prompt")
    return items


def controls_seconds(controls, frame_rate: float) -> float:
    """The clip length the given controls cover (the longest), in seconds."""
    items = _per_prompt(controls, 1) if isinstance(controls, Mapping) else list(controls)
    frames = [int(found["num_frames"]) for item in items for found in item.values()]
    if not frames:
        raise DiffusionError("no controls given")
    return (max(frames) - 1) / float(frame_rate)


def control_inputs(loaded: LoadedControlNet, controls, n: int, frames: int, frame_rate: float,
                   ranges: Mapping | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ControlNet's inputs for N prompts of FRAMES latent frames.

    Args:
      loaded: the ControlNet (its controls say which names it takes).
      controls: `{name: controls}` for every prompt or a list of them, one per prompt; each
        value in the form of `ldm_jax.controls` at the latent frame rate, holding `name`.
      n: prompts.
      frames: latent frames of the clips.
      frame_rate: the latent frame rate.
      ranges: `{name: (start, end)}` seconds where that control is given (default: all).

    Returns:
      (values float32 [n, frames, channels], mask float32 [n, frames, controls]).

    Raises:
      DiffusionError: a control this ControlNet was not trained on, one at another frame
        rate, one shorter than the clip or its range, or an empty range.
    """
    names = list(loaded.controls)
    ranges = dict(ranges or {})
    values = np.zeros((n, frames, loaded.model.control_channels), np.float32)
    mask = np.zeros((n, frames, len(names)), np.float32)
    for i, item in enumerate(_per_prompt(controls, n)):
        unknown = [k for k in list(item) + list(ranges) if k not in names]
        if unknown:
            raise DiffusionError(f"this ControlNet was trained on {', '.join(names)}, not on "
                                 f"{', '.join(sorted(set(unknown)))}")
        for name, found in item.items():
            if name not in found:
                raise DiffusionError(f"the {name} control given holds no {name} (it has "
                                     f"{', '.join(k for k in found if k in CONTROLS)})")
            rate = float(found.get("frame_rate", frame_rate))
            if abs(rate - frame_rate) > 1e-6 * frame_rate:
                raise DiffusionError(f"the {name} control is at {rate:g} frames/s, the model "
                                     f"at {frame_rate:g}; extract it at --frame-rate "
                                     f"{frame_rate:g}")
            start, end = ranges.get(name, (0.0, None))
            first = int(np.floor(float(start) * frame_rate))
            last = frames if end is None else min(frames, int(np.ceil(float(end) * frame_rate)))
            if not 0 <= first < last:
                raise DiffusionError(f"the {name} range [{start}, {end}] s is empty or outside "
                                     f"the clip of {(frames - 1) / frame_rate:.2f} s")
            have = int(found["num_frames"])
            if have < last - 1:  # one frame of slack: decoders round clip lengths
                raise DiffusionError(f"the {name} control covers {(have - 1) / frame_rate:.2f} "
                                     f"s but is asked for up to {(last - 1) / frame_rate:.2f} "
                                     "s; give a shorter --seconds or --control-end")
            k = names.index(name)
            lo = sum(CONTROLS[c] for c in names[:k])
            values[i, :, lo:lo + CONTROLS[name]] = control_frames({name: found[name]}, [name],
                                                                  frames)
            mask[i, first:min(last, have), k] = 1.0
    return values, mask


def sample_masks(rng: jax.Array, batch: int, frames: int, num_controls: int,
                 cfg: ControlMaskConfig) -> jax.Array:
    """Training masks float32 [batch, frames, num_controls] (see `ControlMaskConfig`)."""
    r_drop, r_span, r_len, r_start = jax.random.split(rng, 4)
    shape = (batch, num_controls)
    present = jax.random.uniform(r_drop, shape) >= cfg.drop
    spanned = jax.random.uniform(r_span, shape) < cfg.span_prob
    length = jax.random.uniform(r_len, shape) * cfg.span_max * frames
    start = jax.random.uniform(r_start, shape) * (frames - length)
    t = jnp.arange(frames, dtype=jnp.float32)[None, None, :]
    inside = (t >= start[..., None]) & (t < (start + length)[..., None])
    mask = present[..., None] & ~(spanned[..., None] & inside)
    return jnp.transpose(mask, (0, 2, 1)).astype(jnp.float32)


_UNET_FIELDS = frozenset(f.name for f in dataclasses.fields(UNetConfig))


def base_unet(cfg) -> UNet:
    """The frozen U-Net of a merged ControlNet config."""
    return make_unet({k: v for k, v in dict(cfg.model).items() if k in _UNET_FIELDS})


FEATURES_FILE = "features.json"


# ------------------------------------------------------------------------------------- loading

@dataclasses.dataclass
class LoadedControlNet:
    """A trained ControlNet: its model, EMA parameters, controls and feature config."""

    model: ControlNet
    params: Any
    features: Any
    step: int

    @property
    def controls(self) -> tuple[str, ...]:
        return self.model.controls


def load_trained(directory: str, *, use_ema: bool = True) -> LoadedControlNet:
    """The ControlNet trained in DIRECTORY (W/controlnet, or W holding one), with its
    feature config (what `Generator.generate(controls=...)` uses).

    Raises:
      DiffusionError: no trained ControlNet there.
    """
    from ldm_jax import checkpoint
    from ldm_jax.controls import FeatureConfig
    from ldm_jax.diffusion.config import CONFIG_FILE

    for candidate in (os.path.join(directory, "controlnet"), directory):
        if paths.isfile(os.path.join(candidate, FEATURES_FILE)) and \
                paths.isdir(os.path.join(candidate, "checkpoints")):
            break
    else:
        raise DiffusionError(f"no trained ControlNet in {directory}; run `ldm-jax train "
                             "controlnet --workdir W` first")
    cfg = json.loads(paths.read_text(os.path.join(candidate, CONFIG_FILE)))
    features = FeatureConfig.from_dict(json.loads(paths.read_text(
        os.path.join(candidate, FEATURES_FILE))))
    params, step, _ = checkpoint.read_params(candidate, use_ema=use_ema)
    return LoadedControlNet(make_controlnet(cfg["model"]), params, features, step)


def load(source: str, *, use_ema: bool = True) -> tuple[ControlNet, dict]:
    """The model contract's loader: `(ControlNet, {"params": ...})` of a trained ControlNet
    (W/controlnet or W; its EMA parameters unless `use_ema` is False)."""
    loaded = load_trained(source, use_ema=use_ema)
    return loaded.model, {"params": loaded.params}


def init_variables(model: ControlNet, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Fresh variables `{"params": ...}` of a ControlNet (random: `copied_from_base` takes a
    trained U-Net's values for the copied part)."""
    return {"params": init_params(model, rng, boxed=boxed)}
