"""The latent diffusion experiment's sections that training and generation both read.

`diffusion` (the noise schedule, objective, loss weighting, condition dropout and latent
normalisation) and `train` (the optimiser, EMA, and how the U-Net is conditioned), as frozen
dataclasses whose defaults are the only ones; and the names of the files an LDM stage directory
holds beside its checkpoints (its config and the latents' statistics), which `Generator` reads.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ldm_jax.config import Section
from ldm_jax.diffusion import schedules
from ldm_jax.diffusion.schedules import DiffusionError

CONFIG_FILE = "config.json"
STATS_FILE = "latent_stats.json"
LR_SCHEDULES = ("constant", "cosine")
NORMALIZATIONS = ("global", "channel")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(Section):
    """The `diffusion` section."""

    SECTION: ClassVar[str] = "diffusion"
    LABEL: ClassVar[str] = "diffusion config"
    ERROR: ClassVar[type[Exception]] = DiffusionError

    schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    objective: str = "v"  # "epsilon", "v" or "x0" (or an alias: "eps", "v_prediction", ...)
    min_snr_gamma: float = 5.0  # 0 disables the weighting
    snr_shift: float = 1.0  # divides every timestep's SNR (simple diffusion's shifted schedule)
    cond_drop: float = 0.1  # probability of training a caption as the null condition
    normalize: str = "global"  # "global" (LDM's scale factor) or "channel" (mean / std)

    def __post_init__(self):
        object.__setattr__(self, "objective", schedules.canonical_objective(self.objective))
        if self.normalize not in NORMALIZATIONS:
            raise DiffusionError(f"diffusion.normalize={self.normalize!r}: use 'global' or "
                                 "'channel'")
        if not 0.0 <= self.cond_drop < 1.0:
            raise DiffusionError(f"diffusion.cond_drop={self.cond_drop} must be in [0, 1)")
        if self.num_train_timesteps < 2:
            raise DiffusionError("diffusion.num_train_timesteps must be at least 2")
        if self.min_snr_gamma < 0 or self.snr_shift <= 0:
            raise DiffusionError("diffusion.min_snr_gamma must be >= 0 and diffusion.snr_shift "
                                 "> 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """The `train` section of an LDM experiment."""

    SECTION: ClassVar[str] = "train"
    LABEL: ClassVar[str] = "LDM train config"
    ERROR: ClassVar[type[Exception]] = DiffusionError

    steps: int = 2000
    batch_size: int = 16
    grad_accum_steps: int = 1  # micro-batches per step: 1/k of the activation memory
    lr: float = 1e-4
    warmup: int = 0
    lr_schedule: str = "constant"  # or "cosine"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    condition_on_audio: bool = False  # MusicLDM: train on CLAP audio embeddings
    text_layer: int = -1  # CLAP text layer the U-Net's context is taken from
    mixup: float = 0.0  # MusicLDM's beat-synchronous latent mixup: share of examples mixed
    mixup_tempo_tolerance: float = 0.05  # partners' tempos within this share of the clip's
    mixup_beta: float = 5.0  # the mixing weight ~ Beta(mixup_beta, mixup_beta)

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise DiffusionError(f"train.lr_schedule={self.lr_schedule!r}: use 'constant' or "
                                 "'cosine'")
        if self.steps < 0 or self.batch_size < 1 or self.warmup < 0:
            raise DiffusionError("train.steps and train.warmup must be >= 0 and "
                                 "train.batch_size >= 1")
        if self.grad_accum_steps < 1 or self.batch_size % self.grad_accum_steps:
            raise DiffusionError(f"train.grad_accum_steps={self.grad_accum_steps} must be >= 1 "
                                 f"and divide train.batch_size={self.batch_size}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise DiffusionError(f"train.ema_decay={self.ema_decay} must be in [0, 1]")
        if not 0.0 <= self.mixup <= 1.0 or self.mixup_tempo_tolerance < 0 or \
                self.mixup_beta <= 0:
            raise DiffusionError("train.mixup must be in [0, 1], train.mixup_tempo_tolerance "
                                 ">= 0 and train.mixup_beta > 0")
        if self.mixup and not self.condition_on_audio:
            raise DiffusionError("train.mixup conditions a mix on its CLAP audio embedding: set "
                                 "train.condition_on_audio=True")


@dataclasses.dataclass(frozen=True)
class SamplingConfig(Section):
    """How audio is sampled from a trained LDM: the options every generating path shares
    (`Generator.generate`, the samples, the evaluation, TensorBoard media, `ldm-jax generate`).
    """

    LABEL: ClassVar[str] = "sampling config"
    ERROR: ClassVar[type[Exception]] = DiffusionError

    seconds: float | None = None  # None: the training crop (`data.crop_seconds`)
    steps: int = 50
    sampler: str = "dpmpp_2m"  # "ddim", "euler", "ddpm"
    cfg_scale: float = 3.0  # classifier-free guidance; 1 is the conditional model alone
    seed: int = 0  # prompt i starts from the noise of seed + i
    batch_size: int = 8  # prompts sampled together

    def __post_init__(self):
        from ldm_jax.diffusion.samplers import canonical_sampler

        canonical_sampler(self.sampler)
        if self.seconds is not None and not self.seconds > 0:
            raise DiffusionError(f"{self.SECTION}.seconds={self.seconds} must be positive")
        if self.steps < 1 or self.batch_size < 1 or self.seed < 0:
            raise DiffusionError(f"{self.SECTION}.steps and batch_size must be positive and seed "
                                 ">= 0")

    def sampling(self) -> dict:
        """The keyword arguments of `Generator.generate` these options set."""
        return {"seconds": self.seconds, "steps": self.steps, "sampler": self.sampler,
                "cfg_scale": self.cfg_scale, "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class GenerationConfig(SamplingConfig):
    """The `generation` section: the samples written after training and the TensorBoard media."""

    SECTION: ClassVar[str] = "generation"
    LABEL: ClassVar[str] = "generation config"

    prompts: tuple[str, ...] = ()
    negative_prompt: str = ""  # replaces the null condition in the unconditional branch
    media_steps: int = 25  # sampler steps of the TensorBoard samples during training

    def sampling(self) -> dict:
        return {**super().sampling(), "negative_prompt": self.negative_prompt or None}


@dataclasses.dataclass(frozen=True)
class EvalConfig(SamplingConfig):
    """The `eval` section: how the generation evaluation samples its test prompts."""

    SECTION: ClassVar[str] = "eval"
    LABEL: ClassVar[str] = "generation eval config"

    num_prompts: int = 32


CONTROL_INPUTS = ("truth", "audio")


@dataclasses.dataclass(frozen=True)
class ControlEvalConfig(SamplingConfig):
    """The ControlNet's `eval` section: how `ldm-jax eval controls` samples the test clips."""

    SECTION: ClassVar[str] = "controlnet.eval"
    LABEL: ClassVar[str] = "ControlNet eval config"

    num_prompts: int = 64
    inputs: str = "truth"  # the controls given: the clips' stored truth, or extracted ("audio")
    bootstrap: int = 1000  # resamples of the intervals of the control metrics
    fd_bootstrap: int = 200  # resamples of the Fréchet distance's interval (a matrix root each)

    def __post_init__(self):
        super().__post_init__()
        if self.inputs not in CONTROL_INPUTS:
            raise DiffusionError(f"{self.SECTION}.inputs={self.inputs!r}: use 'truth' or "
                                 "'audio'")
        if self.num_prompts < 1 or self.bootstrap < 10 or self.fd_bootstrap < 10:
            raise DiffusionError(f"{self.SECTION}.num_prompts must be positive and bootstrap "
                                 "and fd_bootstrap at least 10")


DITTO_TASKS = ("intensity", "melody", "structure", "loop", "outpaint")


@dataclasses.dataclass(frozen=True)
class DittoEvalConfig(Section):
    """The `ditto.eval` section: how `ldm-jax eval ditto` scores DITTO on test clips.

    Targets come from the first `num_clips` test clips' first `seconds`: their dB curve
    (intensity), their melody (melody), their audio (outpainting continues it past its first
    half); structure asks for `structure_pattern`, looping for a seamless loop matched over
    `loop_seconds`. The ControlNet (where W has one) is sampled with `controlnet_steps` of
    `controlnet_sampler` on the same controls and seeds. Long-form generation makes
    `long_clips` clips of `long_seconds` from the first test captions with each of
    `long_forms`, and measures their seams.
    """

    SECTION: ClassVar[str] = "ditto.eval"
    LABEL: ClassVar[str] = "DITTO eval config"
    ERROR: ClassVar[type[Exception]] = DiffusionError

    num_clips: int = 32
    seconds: float = 2.0
    batch_size: int = 8
    seed: int = 0
    tasks: tuple[str, ...] = DITTO_TASKS
    structure_pattern: str = "AABA"
    loop_seconds: float = 0.4
    controlnet_steps: int = 25
    controlnet_sampler: str = "dpmpp_2m"
    bootstrap: int = 1000
    fd_bootstrap: int = 200
    long_seconds: float = 30.0  # long-form generation: clips of this length
    long_clips: int = 4  # of the first test captions (0: none)
    long_forms: tuple[str, ...] = ("window",)  # "window", "ditto"
    long_steps: int = 25  # sampler steps of the windows (dpmpp_2m; DITTO: its own sampler)
    long_window_seconds: float = 0.0  # 0: the training length
    long_overlap_seconds: float = 0.0  # 0: a quarter of the window

    def __post_init__(self):
        if any(m not in ("window", "ditto") for m in self.long_forms) or \
                self.long_clips < 0 or self.long_steps < 1 or not self.long_seconds > 0 or \
                self.long_window_seconds < 0 or self.long_overlap_seconds < 0:
            raise DiffusionError(f"{self.SECTION}.long_forms takes 'window' and 'ditto'; "
                                 "long_clips >= 0, long_steps and long_seconds positive, "
                                 "the long-form window and overlap >= 0")
        unknown = [t for t in self.tasks if t not in DITTO_TASKS]
        if unknown or not self.tasks:
            raise DiffusionError(f"{self.SECTION}.tasks {list(self.tasks)}: choose from "
                                 f"{DITTO_TASKS}")
        if self.num_clips < 2 or self.batch_size < 1 or self.seed < 0:
            raise DiffusionError(f"{self.SECTION}.num_clips must be at least 2, batch_size "
                                 "positive and seed >= 0")
        if not (self.seconds > 0 and self.loop_seconds > 0 and
                2 * self.loop_seconds < self.seconds):
            raise DiffusionError(f"{self.SECTION}.seconds and loop_seconds must be positive, "
                                 "the loop region under half the clip")
        if self.controlnet_steps < 1 or self.bootstrap < 10 or self.fd_bootstrap < 10:
            raise DiffusionError(f"{self.SECTION}.controlnet_steps must be positive and "
                                 "bootstrap and fd_bootstrap at least 10")
        from ldm_jax.diffusion.samplers import canonical_sampler

        canonical_sampler(self.controlnet_sampler)


def diffusion_config(cfg) -> DiffusionConfig:
    """The `diffusion` section of an experiment config; an unknown key is an error naming it."""
    return DiffusionConfig.from_dict(cfg.get("diffusion", None) or {})


def train_config(cfg) -> TrainConfig:
    """The `train` section of an LDM experiment config."""
    return TrainConfig.from_dict(cfg.get("train", None) or {})


def schedule_from_config(cfg) -> schedules.Schedule:
    d = diffusion_config(cfg)
    return schedules.make_schedule(d.schedule, d.num_train_timesteps, d.beta_start, d.beta_end,
                                   d.snr_shift)


def generation_config(cfg) -> GenerationConfig:
    """The `generation` section of an LDM experiment config."""
    return GenerationConfig.from_dict(cfg.get("generation", None) or {})


def eval_config(cfg) -> EvalConfig:
    """The `eval` section of an LDM experiment config."""
    return EvalConfig.from_dict(cfg.get("eval", None) or {})
