"""Text-to-audio generation: prompt -> CLAP conditions -> guided sampler -> latents -> audio.

The last step of latent diffusion (Rombach et al. 2022), as in AudioLDM (Liu et al. 2023):
the prompt's frozen CLAP conditions drive a sampler (`diffusion.samplers`: DDIM, DPM-Solver++ 2M,
Euler, DDPM) over the trained U-Net with classifier-free guidance (Ho & Salimans 2022) computed
on one doubled batch; a negative prompt takes the place of the null condition in the
unconditional half. Audio-to-audio variation noises the codec latents of a given clip to a
strength and samples from there (SDEdit, Meng et al. 2022); inpainting regenerates a time range
while the latents outside it are kept, re-noised to every step's level (the samplers' inpaint
hook). The sampled latents are unscaled with the training statistics and decoded by the codec.

A `Generator` loads the codec (W/codec), CLAP (W/clap) and the LDM's EMA parameters (W/ldm)
once and keeps one compiled sampler per setting. Each prompt's starting noise is a function of
its own seed only, so a sample does not depend on the other prompts of the call. Prompts are
conditioned, sampled and decoded in batches of `batch_size`, each on its own, so on several
hosts `generate_shared` gives each host whole batches and returns what one host would.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import checkpoint, parallel, paths
from ldm_jax.diffusion import conditioning, controlnet, samplers
from ldm_jax.diffusion import config as ldm_config
from ldm_jax.diffusion.schedules import DiffusionError
from ldm_jax.diffusion.unet import PRESETS, UNet, init_variables, make_unet

SAMPLES_DIR = "samples"
SAMPLES_INDEX = "samples.json"
LONG_FORMS = ("window", "ditto", "none")


def ldm_dir(workdir: str) -> str:
    """W/ldm, or WORKDIR itself when it is an LDM stage directory."""
    for candidate in (os.path.join(workdir, "ldm"), workdir):
        if paths.isfile(os.path.join(candidate, ldm_config.CONFIG_FILE)) and \
                paths.isdir(os.path.join(candidate, "checkpoints")):
            return candidate
    raise DiffusionError(f"no trained latent diffusion model in {workdir}; run `ldm-jax train "
                         "ldm --workdir W` first")


def load_params(directory: str, use_ema: bool = True):
    """(parameters, step) of an LDM stage directory's latest checkpoint (its EMA parameters
    unless `use_ema` is False), read on this host alone."""
    params, step, _ = checkpoint.read_params(directory, use_ema=use_ema)
    return params, step


def load(source: str, *, rng: jax.Array | None = None, use_ema: bool = True
         ) -> tuple[UNet, dict]:
    """The U-Net and its variables, from a trained LDM directory or a preset.

    Args:
      source: a trained LDM stage directory (W/ldm) or a workdir W holding one (its EMA
        parameters), a model file from `ldm-jax export` (`.msgpack`), or a name in
        `unet.PRESETS` (freshly initialised).
      rng: PRNG key for a preset's initialisation (default `PRNGKey(0)`).
      use_ema: a trained model's EMA parameters (else its raw parameters).

    Returns:
      `(unet, {"params": ...})`.
    """
    if source in PRESETS:
        model = make_unet(PRESETS[source])
        return model, init_variables(model, jax.random.PRNGKey(0) if rng is None else rng)
    if source.endswith(".msgpack"):
        exported = checkpoint.read_export(source, "ldm")
        return make_unet(exported["config"]["model"]), exported["variables"]
    try:
        directory = ldm_dir(source)
    except DiffusionError:
        raise DiffusionError(f"cannot load a U-Net from {source!r}: give a trained LDM "
                             f"directory or workdir, or one of the presets "
                             f"{', '.join(sorted(PRESETS))}") from None
    cfg = json.loads(paths.read_text(os.path.join(directory, ldm_config.CONFIG_FILE)))
    params, _ = load_params(directory, use_ema)
    return make_unet(cfg["model"]), {"params": params}


def _clips(audio) -> list[np.ndarray]:
    """[T] (one clip), [B, T], [B, T, C] or a list of [T] / [T, C] -> list of clips."""
    if isinstance(audio, np.ndarray | jax.Array):
        audio = np.asarray(audio, np.float32)
        if audio.ndim == 1:
            return [audio]
        return list(audio)
    return [np.asarray(a, np.float32) for a in audio]


class Generator:
    """Loads the trained chain once and generates audio from prompts.

    Attributes:
      cfg: the LDM experiment config.
      params: the U-Net parameters used (EMA by default).
      codec: the `LoadedCodec`.
      clap: the `ClapModel`.
      stats: the `LatentStats` the LDM was trained with.
      batch_size: prompts sampled together.
    """

    def __init__(self, workdir: str, *, batch_size: int = 8, use_ema: bool = True):
        from ldm_jax.clap.model import ClapModel
        from ldm_jax.codec.inference import load_trained
        from ldm_jax.data.latents import LatentStats

        directory = ldm_dir(workdir)
        cfg = ml_collections.ConfigDict(json.loads(
            paths.read_text(os.path.join(directory, ldm_config.CONFIG_FILE))))
        stats_dict = json.loads(paths.read_text(os.path.join(directory, ldm_config.STATS_FILE)))
        params, self.step = load_params(directory, use_ema)
        root = os.path.dirname(directory) if os.path.basename(directory) == "ldm" else workdir
        self.root = root
        self._setup(cfg, params, codec=load_trained(root),
                    clap=ClapModel.load(os.path.join(root, "clap")),
                    stats=LatentStats.from_dict(stats_dict),
                    latent=stats_dict.get("latent", "z"), batch_size=batch_size)

    @classmethod
    def from_parts(cls, cfg, params, *, codec, clap, stats, latent: str | None = None,
                   batch_size: int = 8) -> Generator:
        """A Generator from objects in memory (a training run's state, tests).

        Args:
          cfg: the LDM experiment config.
          params: U-Net parameters (may be set later through `.params`).
          codec: a `LoadedCodec`; clap: a `ClapModel`; stats: a `LatentStats`.
          latent: which codec output the latents are ("z", or "mean" for a KL codec); None
            infers it from the codec.
          batch_size: prompts sampled together.
        """
        self = cls.__new__(cls)
        self.step, self.root = None, None
        if latent is None:
            latent = "mean" if codec.config.quantizer == "kl" else "z"
        self._setup(cfg, params, codec=codec, clap=clap, stats=stats, latent=latent,
                    batch_size=batch_size)
        return self

    def _setup(self, cfg, params, *, codec, clap, stats, latent, batch_size):
        conditioning.check_clap(cfg, clap)
        self.cfg, self.params, self.codec, self.clap, self.stats = cfg, params, codec, clap, stats
        self.latent, self.batch_size = latent, int(batch_size)
        d = ldm_config.diffusion_config(cfg)
        self.objective, self.normalize = d.objective, d.normalize
        self.mode = conditioning.conditioning_mode(cfg)
        self.text_layer = conditioning.text_layer(cfg, clap)
        self.unet = make_unet(cfg.model)
        self.schedule = ldm_config.schedule_from_config(cfg)
        data = cfg.get("data", None) or {}
        # The natural length of a sample: the latent crops the U-Net was trained on.
        self.default_seconds = float(data["crop_seconds"]) if data.get("crop_seconds") else None
        self._fns = {}
        self._controlnet = None

    @property
    def controlnet(self):
        """The trained ControlNet beside the LDM (W/controlnet), loaded on first use; may be set
        to a `controlnet.LoadedControlNet`."""
        if self._controlnet is None:
            if self.root is None:
                raise DiffusionError("this generator has no ControlNet: set .controlnet")
            self._controlnet = controlnet.load_trained(self.root)
        return self._controlnet

    @controlnet.setter
    def controlnet(self, loaded):
        self._controlnet = loaded

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    def frames_for(self, seconds: float) -> int:
        """Latent frames sampled for `seconds` of audio: one more than whole frames cover, since
        decoders with odd strides return a little less than frames x hop samples."""
        return int(np.floor(float(seconds) * self.stats.frame_rate + 1e-6)) + 1

    def condition(self, prompts: Sequence[str]) -> dict:
        """CLAP conditions of the prompts (as in training; see `conditioning.text_condition`)."""
        return conditioning.text_condition(self.clap, list(prompts), self.mode, self.text_layer)

    def unconditional(self, cond: dict, negative: dict | None = None) -> dict:
        """The unconditional branch's condition for `cond`'s rows: the null condition, or a
        negative prompt's condition (`condition([negative_prompt])`) repeated."""
        if negative is None:
            return conditioning.null_condition(cond)
        rows = len(cond["pooled"])
        return {k: np.repeat(v, rows, axis=0) for k, v in negative.items()}

    def initial_noise(self, seeds: Sequence[int], frames: int) -> np.ndarray:
        """The starting noise x_T [len(seeds), frames, D] of the given seeds, each a function
        of its seed alone."""
        dim = self.stats.latent_dim
        return np.stack([np.random.default_rng(int(s)).standard_normal((frames, dim))
                         for s in seeds]).astype(np.float32)

    def encode_audio(self, audio, frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Clips at the codec's rate -> (normalised latents [B, frames, D], bool [B, frames]
        True where the clip has audio); shorter clips are zero-padded, longer ones cut."""
        from ldm_jax.codec.latents import encode_clips

        zs = encode_clips(self.codec, _clips(audio), self.latent, self.batch_size)
        x = np.zeros((len(zs), frames, self.stats.latent_dim), np.float32)
        have = np.zeros((len(zs), frames), bool)
        for i, z in enumerate(zs):
            n = min(frames, z.shape[0])
            x[i, :n] = self.stats.normalize(z[:n], self.normalize)
            have[i, :n] = True
        return x, have

    def decode_latents(self, z) -> np.ndarray:
        """Codec latents [T, D] or [B, T, D] (not normalised) -> audio [T'] or [B, T'] (mono) or
        with a channel axis for a multichannel codec."""
        z = np.asarray(z, np.float32)
        audio = self.codec.decode(z[None] if z.ndim == 2 else z)
        if audio.shape[-1] == 1:
            audio = audio[..., 0]
        return audio[0] if z.ndim == 2 else audio

    def model_fn(self, params, cond, uncond, scale, *, guided: bool, controlled: bool = False,
                 control_scale=1.0):
        """The sampler's model function x, t -> prediction (traceable): the U-Net with
        `params` (or `{"base", "controlnet"}` through the ControlNet when `controlled`) on the
        conditions `cond` (and `uncond`, guided by `scale` on one doubled batch when `guided`)."""
        unet = self.unet
        control_model = self.controlnet.model if controlled else None

        def model_fn(x, t, c):
            if controlled:
                return controlnet.apply_controlled(
                    unet, params["base"], control_model, params["controlnet"], x, t,
                    c["context"], c["context_mask"], c["pooled"], c["controls"],
                    c["control_mask"], scale=control_scale)
            return unet.apply({"params": params}, x, t, c["context"], c["context_mask"],
                              c["pooled"])[0]

        if guided:
            return samplers.cfg_batched_model_fn(model_fn, cond, uncond, scale)
        return lambda x, t: model_fn(x, t, cond)

    def latents_to_audio(self, latents, samples: int) -> np.ndarray:
        """Sampled (normalised) latents [B, frames, D] -> audio [B, samples] cut or zero-padded
        to `samples` (with a channel axis for a multichannel codec)."""
        z = self.stats.denormalize(np.asarray(latents, np.float32), self.normalize)
        audio = self.codec.decode(z)[:, :samples]
        if audio.shape[1] < samples:
            audio = np.pad(audio, [(0, 0), (0, samples - audio.shape[1]), (0, 0)])
        return audio[..., 0] if audio.shape[-1] == 1 else audio

    def _sampler(self, sampler: str, steps: int, guided: bool, strength: float | None,
                 inpaint: bool, controlled: bool = False):
        key = (sampler, steps, guided, strength, inpaint, controlled)
        if key not in self._fns:
            schedule, objective = self.schedule, self.objective

            def run(params, noise, cond, uncond, scale, x_init, known, mask, rng, control_scale):
                fn = self.model_fn(params, cond, uncond, scale, guided=guided,
                                   controlled=controlled, control_scale=control_scale)
                return samplers.sample(sampler, fn, noise, schedule, steps, objective, rng=rng,
                                       inpaint=(known, mask) if inpaint else None,
                                       x_init=x_init if strength is not None else None,
                                       strength=strength)

            self._fns[key] = jax.jit(run)
        return self._fns[key]

    def generate(self, prompts: str | Sequence[str], *, seconds: float | None = None,
                 steps: int = 50, sampler: str = "dpmpp_2m", cfg_scale: float = 3.0,
                 negative_prompt: str | None = None, seed: int | Sequence[int] = 0,
                 init_audio=None, strength: float = 0.6, inpaint_audio=None,
                 inpaint_start: float | None = None, inpaint_end: float | None = None,
                 controls=None, control_ranges=None, control_scale: float = 1.0,
                 long_form: str | None = None, window_seconds: float | None = None,
                 overlap_seconds: float | None = None, ditto_config=None,
                 return_latents: bool = False, progress: bool = False,
                 batches: Sequence[int] | None = None):
        """Generates one clip per prompt, on this host's devices.

        Args:
          prompts: a prompt or a list of B prompts.
          seconds: clip length; None takes the length of `init_audio` or `inpaint_audio`, else
            the length the U-Net was trained on (`data.crop_seconds`, `default_seconds`).
          steps: sampler steps.
          sampler: "dpmpp_2m", "ddim", "euler" or "ddpm".
          cfg_scale: classifier-free guidance scale (1: the conditional model alone).
          negative_prompt: replaces the null condition in the unconditional branch.
          seed: an int (prompt i uses seed + i) or one seed per prompt; a prompt's starting noise
            depends on its seed alone (DDPM's step noise also on the batch it is sampled in).
          init_audio: audio-to-audio: clips at the codec's sample rate ([T] for all prompts,
            [B, T], [B, T, C] or a list); its latents are noised to `strength` and denoised.
          strength: share of the sampler's steps run from the noised `init_audio` (1 = from
            pure noise).
          inpaint_audio: clips (as `init_audio`) whose latents are kept outside
            [inpaint_start, inpaint_end] seconds (default: the whole clip); the range between is
            generated.
          inpaint_start, inpaint_end: the regenerated range in seconds.
          controls: time-varying controls through the trained ControlNet (W/controlnet):
            `{name: controls}` with name "melody", "dynamics" or "rhythm" and controls in the
            form of `ldm_jax.controls` (`controls_from_file` of a reference clip, a MIDI file or
            a CSV curve), for every prompt, or a list of such dicts, one per prompt.
          control_ranges: `{name: (start, end)}` seconds where a control is given (default:
            all of the clip); outside it the control is masked.
          control_scale: multiplies the ControlNet's residuals (0: the base model).
          long_form: how a clip longer than `window_seconds` is made: "window" (windowed
            outpainting: windows of `window_seconds`, each inpainting its first
            `overlap_seconds` with the end of the previous one, all decoded together),
            "ditto" (each window's noise optimised so its overlap matches instead, with
            `ditto_config`, a `ditto.DittoConfig`), or "none" (sampled in one piece). Default:
            "window" for text alone, "none" with init, inpaint or control inputs.
          window_seconds: the window (default: the training length).
          overlap_seconds: the overlap (default: a quarter of the window).
          ditto_config: the `ditto.DittoConfig` of long_form="ditto" (default: its defaults).
          return_latents: also return the sampled latents (normalised) [B, frames, D].
          progress: show a progress bar over batches.
          batches: generate only these batches of `batch_size` prompts (`generate_shared`);
            the others get no rows in the output.

        Returns:
          float32 audio [B, samples] (with a trailing channel axis for a multichannel codec),
          samples = round(seconds * sample_rate); with return_latents, (audio, latents).
        """
        from tqdm.auto import tqdm

        prompts, seeds = prompts_and_seeds(prompts, seed)
        n = len(prompts)
        _check_options(seconds=seconds, steps=steps, cfg_scale=cfg_scale, strength=strength,
                       sampler=sampler)
        if seconds is None:
            reference = init_audio if init_audio is not None else inpaint_audio
            if controls is not None and reference is None:
                seconds = controlnet.controls_seconds(controls, self.stats.frame_rate)
            elif reference is not None:
                seconds = max(len(c) for c in _clips(reference)) / self.sample_rate
            elif self.default_seconds is not None:
                seconds = self.default_seconds
            else:
                raise DiffusionError("give seconds: this model's config records no training "
                                     "length (data.crop_seconds)")
        frames = self.frames_for(seconds)
        dim = self.stats.latent_dim
        inputs = [name for name, value in (("init_audio", init_audio),
                                           ("inpaint_audio", inpaint_audio),
                                           ("controls", controls)) if value is not None]
        if long_form in ("window", "ditto") and inputs:
            raise DiffusionError(f"long-form generation takes text alone, not {inputs[0]}; "
                                 "say long_form='none' to sample the clip in one piece")
        plan = self.long_form_plan(seconds, "none" if inputs and long_form is None else
                                   long_form or "window", window_seconds, overlap_seconds)

        def per_prompt(x):
            return np.broadcast_to(x, (n,) + x.shape[1:]) if x.shape[0] == 1 else x

        x_init = None
        if init_audio is not None:
            x_init = per_prompt(self.encode_audio(init_audio, frames)[0])
        known = mask = None
        if inpaint_audio is not None:
            known, have = self.encode_audio(inpaint_audio, frames)
            start = 0.0 if inpaint_start is None else float(inpaint_start)
            end = float(seconds) if inpaint_end is None else float(inpaint_end)
            if not 0.0 <= start < end:
                raise DiffusionError(f"inpaint range [{start}, {end}] s is empty or negative")
            keep = have.copy()
            keep[:, int(np.floor(start * self.stats.frame_rate)):
                 int(np.ceil(end * self.stats.frame_rate))] = False
            known, mask = per_prompt(known), per_prompt(keep[..., None].astype(np.float32))
        for name, value in (("init_audio", x_init), ("inpaint_audio", known)):
            if value is not None and value.shape[0] != n:
                raise DiffusionError(f"{name} has {value.shape[0]} clips for {n} prompts; give "
                                     "one clip, or one per prompt")

        values = given = None
        if controls is not None:
            values, given = controlnet.control_inputs(self.controlnet, controls, n, frames,
                                                      self.stats.frame_rate, control_ranges)
        guided = not (isinstance(cfg_scale, int | float) and float(cfg_scale) == 1.0)
        negative = self.condition([negative_prompt]) if negative_prompt else None
        if plan is not None and plan["method"] == "ditto":
            from ldm_jax.diffusion import ditto
            ditto_config = ditto_config or ditto.DittoConfig()
            sampler, steps = ditto_config.sampler, ditto_config.sampler_steps
            cfg_scale, guided = ditto_config.cfg_scale, float(ditto_config.cfg_scale) != 1.0
        fn = self._sampler(sampler, int(steps), guided,
                           float(strength) if x_init is not None else None,
                           known is not None or plan is not None, values is not None)
        params = self.params if values is None else {"base": self.params,
                                                     "controlnet": self.controlnet.params}
        samples = int(round(float(seconds) * self.sample_rate))
        chunks = range(0, n, self.batch_size)
        chosen = range(len(chunks)) if batches is None else batches
        audio_out, latents_out = [], []
        for k in tqdm(chosen, desc="generate", disable=not progress or len(chosen) < 2,
                      leave=False):
            begin = chunks[k]
            rows = min(self.batch_size, n - begin)
            size = parallel.bucket_rows(rows, self.batch_size)
            take = functools.partial(_rows, begin=begin, rows=rows, size=size)
            cond = {k: _rows(v, begin=0, rows=rows, size=size)
                    for k, v in self.condition(prompts[begin:begin + rows]).items()}
            uncond = self.unconditional(cond, negative)
            if values is not None:  # the same controls in both halves of the guided batch
                both = {"controls": take(values), "control_mask": take(given)}
                cond, uncond = {**cond, **both}, {**uncond, **both}
            if plan is not None:
                latents = self._sample_windows(
                    plan, fn, prompts[begin:begin + rows], seeds[begin:begin + rows], size,
                    cond, uncond, cfg_scale, ditto_config)
            else:
                noise = _rows(self.initial_noise(seeds[begin:begin + rows], frames), begin=0,
                              rows=rows, size=size)  # already this chunk's rows
                latents = np.asarray(fn(params, noise, cond, uncond, jnp.float32(cfg_scale),
                                        take(x_init), take(known), take(mask),
                                        jax.random.key(seeds[begin]),
                                        jnp.float32(control_scale)))[:rows]
            audio_out.append(self.latents_to_audio(latents, samples))
            latents_out.append(latents)
        shape = (0, samples) if self.codec.config.channels == 1 else \
            (0, samples, self.codec.config.channels)
        audio = np.concatenate(audio_out) if audio_out else np.zeros(shape, np.float32)
        latents = np.concatenate(latents_out) if latents_out else \
            np.zeros((0, frames, dim), np.float32)
        return (audio, latents) if return_latents else audio

    def long_form_plan(self, seconds: float, long_form: str = "window",
                       window_seconds: float | None = None,
                       overlap_seconds: float | None = None) -> dict | None:
        """How a clip of `seconds` is made in windows (see `generate`), or None when it is
        sampled in one piece (long_form "none", or no longer than the window).

        Returns:
          {"method", "frames" (of the clip), "window_frames", "overlap_frames", "windows",
           "boundaries": the seconds where each later window's new frames begin}.
        """
        if long_form not in LONG_FORMS:
            raise DiffusionError(f"long_form={long_form!r}: use one of {LONG_FORMS}")
        if long_form == "none":
            return None
        window = self.default_seconds if window_seconds is None else float(window_seconds)
        if window is None:
            raise DiffusionError("give window_seconds: this model's config records no "
                                 "training length (data.crop_seconds)")
        if not (np.isfinite(window) and window > 0):
            raise DiffusionError(f"window_seconds must be a positive number, got {window}")
        if float(seconds) <= window + 1e-9:
            return None
        overlap = window / 4 if overlap_seconds is None else float(overlap_seconds)
        rate = self.stats.frame_rate
        window_frames = self.frames_for(window)
        overlap_frames = int(round(overlap * rate))
        if not (np.isfinite(overlap) and 1 <= overlap_frames < window_frames - 1):
            raise DiffusionError(f"overlap_seconds={overlap:g} must be at least one latent "
                                 f"frame and shorter than the window of {window:g} s")
        frames = self.frames_for(seconds)
        hop = window_frames - overlap_frames
        count = 1 + -(-(frames - window_frames) // hop)
        return {"method": long_form, "frames": frames, "window_frames": window_frames,
                "overlap_frames": overlap_frames, "windows": count,
                "boundaries": [(k * hop + overlap_frames) / rate for k in range(1, count)]}

    def _sample_windows(self, plan: dict, fn, prompts, seeds, size: int, cond, uncond,
                        cfg_scale, ditto_config) -> np.ndarray:
        """Latents [rows, frames, D] of one batch made window by window: each window's noise
        is its span of the seed's noise over the whole length; after the first, a window
        keeps its overlap with the one before (inpainted, or matched by DITTO)."""
        rows = len(seeds)
        wf, of, count = plan["window_frames"], plan["overlap_frames"], plan["windows"]
        hop = wf - of
        noise = _rows(self.initial_noise(seeds, wf + (count - 1) * hop), begin=0, rows=rows,
                      size=size)
        out = None
        for k in range(count):
            window = noise[:, k * hop:k * hop + wf]
            known = np.zeros_like(window)
            mask = np.zeros(window.shape[:2] + (1,), np.float32)
            if out is not None:
                known[:, :of], mask[:, :of] = out[:, -of:], 1.0
            if out is not None and plan["method"] == "ditto":
                from ldm_jax.diffusion import ditto
                term = ditto.region(known[:rows], mask[:rows, :, 0] > 0)
                latents = ditto.Ditto.of(self).run(
                    prompts, [term], config=ditto_config,
                    seconds=(wf - 1) / self.stats.frame_rate, seed=seeds,
                    x_T=window[:rows])["latents"]
            else:
                latents = np.asarray(fn(self.params, window, cond, uncond,
                                        jnp.float32(cfg_scale), None, known, mask,
                                        jax.random.key(seeds[0] + k), jnp.float32(1.0)))[:rows]
            out = latents if out is None else np.concatenate([out, latents[:, of:]], axis=1)
        return out[:, :plan["frames"]]

    def generate_shared(self, prompts: Sequence[str], *, seed: int | Sequence[int] = 0,
                        progress: bool = False, **kwargs) -> np.ndarray:
        """`generate` with its batches shared among the hosts; every host must call it, and
        every host gets all the clips (those one host would generate). Arguments are those of
        `generate`."""
        prompts, seeds = prompts_and_seeds(prompts, seed)
        mine = parallel.host_batches(-(-len(prompts) // self.batch_size))
        audio = self.generate(prompts, seed=seeds, batches=mine,
                              progress=progress and parallel.is_leader(), **kwargs)
        parts, start = [], 0
        for k in mine:
            rows = min(self.batch_size, len(prompts) - k * self.batch_size)
            parts.append(audio[start:start + rows])
            start += rows
        return np.concatenate(parallel.gather_batches(parts))


def prompts_and_seeds(prompts: str | Sequence[str], seed: int | Sequence[int]
                      ) -> tuple[list[str], list[int]]:
    """The prompts as a list and one seed each: seed + i for prompt i from an int, else the
    seeds given (as many as prompts)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise DiffusionError("no prompts to generate from")
    n = len(prompts)
    seeds = [int(seed) + i for i in range(n)] if isinstance(seed, int | np.integer) \
        else [int(s) for s in seed]
    if len(seeds) != n:
        raise DiffusionError(f"{len(seeds)} seeds for {n} prompts; give one per prompt")
    return prompts, seeds


def _check_options(*, seconds, steps, cfg_scale, strength, sampler):
    """Generation options checked before any model work; the message names the option."""
    if seconds is not None and not (np.isfinite(float(seconds)) and float(seconds) > 0):
        raise DiffusionError(f"seconds must be a positive number, got {seconds}")
    if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
        raise DiffusionError(f"steps must be a positive integer, got {steps}")
    if not np.all(np.isfinite(np.asarray(cfg_scale, np.float64))):
        raise DiffusionError(f"cfg_scale must be finite, got {cfg_scale}")
    if not 0.0 < float(strength) <= 1.0:
        raise DiffusionError(f"strength must be in (0, 1], got {strength}")
    samplers.canonical_sampler(sampler)


def _rows(x, *, begin: int, rows: int, size: int):
    """Rows [begin, begin + rows) of x, zero-padded to `size` rows (None stays None)."""
    if x is None:
        return None
    part = np.asarray(x[begin:begin + rows])
    return np.concatenate([part, np.zeros((size - rows,) + part.shape[1:], part.dtype)])


_GENERATORS: dict = {}


def _checkpoint_step(workdir: str):
    directory = os.path.join(ldm_dir(workdir), "checkpoints")
    steps = [int(d) for d in paths.listdir(directory) if d.isdigit()]
    return max(steps) if steps else None


def get_generator(workdir: str, batch_size: int = 8) -> Generator:
    """A cached Generator for WORKDIR (reloaded when a newer LDM checkpoint appears)."""
    key = (paths.resolve(workdir), _checkpoint_step(workdir), int(batch_size))
    if key not in _GENERATORS:
        _GENERATORS.clear()
        _GENERATORS[key] = Generator(workdir, batch_size=batch_size)
    return _GENERATORS[key]


def text_to_audio(prompts: str | Sequence[str], *, workdir: str, seconds: float | None,
                  steps: int = 50, sampler: str = "dpmpp_2m", cfg_scale: float = 3.0,
                  negative_prompt: str | None = None, seed: int | Sequence[int] = 0,
                  init_audio=None, strength: float = 0.6, inpaint_audio=None,
                  inpaint_start: float | None = None, inpaint_end: float | None = None,
                  controls=None, control_ranges=None, control_scale: float = 1.0
                  ) -> np.ndarray:
    """Generates audio for prompts with the chain trained in WORKDIR.

    See `Generator.generate` for the arguments. The Generator is cached per workdir, so
    repeated calls reuse the loaded models and compiled samplers.

    Returns:
      float32 [B, samples] at the codec's sample rate.
    """
    return get_generator(workdir).generate(
        prompts, seconds=seconds, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
        negative_prompt=negative_prompt, seed=seed, init_audio=init_audio, strength=strength,
        inpaint_audio=inpaint_audio, inpaint_start=inpaint_start, inpaint_end=inpaint_end,
        controls=controls, control_ranges=control_ranges, control_scale=control_scale)


def write_samples(workdir: str, prompts: Sequence[str], *, seconds: float, seed: int = 0,
                  out_dir: str | None = None, generator: Generator | None = None,
                  progress: bool = True, **kwargs) -> list[dict]:
    """Generates one clip per prompt into W/samples/sample_NNN.wav with W/samples/samples.json.

    On several hosts every host calls it; the batches are shared and process 0 writes the files.

    Args:
      workdir: W with the trained chain.
      prompts: the prompts.
      seconds: clip length.
      seed: prompt i uses seed + i (recorded per file).
      out_dir: where to write (default W/samples).
      generator: a Generator to reuse (default: the cached one of W).
      progress: show a progress bar.
      **kwargs: further `Generator.generate` arguments (steps, sampler, cfg_scale, ...).

    Returns:
      The index written to samples.json: [{"file", "prompt", "seed"}].
    """
    from ldm_jax.audio.io import write_audio

    gen = generator or get_generator(workdir)
    out_dir = out_dir or os.path.join(workdir, SAMPLES_DIR)
    paths.makedirs(out_dir)
    prompts = list(prompts)
    seeds = [int(seed) + i for i in range(len(prompts))]
    audio = gen.generate_shared(prompts, seconds=seconds, seed=seeds, progress=progress,
                                **kwargs)
    index = [{"file": f"sample_{i:03d}.wav", "prompt": p, "seed": s}
             for i, (p, s) in enumerate(zip(prompts, seeds))]
    if not parallel.is_leader():  # every host samples its batches; one writes
        return index
    for item, clip in zip(index, audio):
        write_audio(os.path.join(out_dir, item["file"]), np.clip(clip, -1.0, 1.0),
                    gen.sample_rate)
    paths.write_text(os.path.join(out_dir, SAMPLES_INDEX), json.dumps(index, indent=1))
    return index
