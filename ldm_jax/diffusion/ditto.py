"""DITTO: control without training, by optimising the initial noise through the sampler.

Novack, McAuley, Berg-Kirkpatrick & Bryan, "DITTO: Diffusion Inference-Time T-Optimization for
Music Generation" (ICML 2024): the initial noise x_T of a trained text-to-music diffusion model
is optimised with Adam so that the audio the sampler makes from it matches a target,

    x_T* = argmin_{x_T} sum_k w_k L_k(f_k(decode(sample(x_T, text))), y_k),

back-propagating through every step of a deterministic sampler (DDIM with eta = 0 or
DPM-Solver++ 2M, with the text condition and the guidance scale fixed), the codec decoder and
the feature extractor. Each sampler step is wrapped in `jax.checkpoint` inside the sampler's one
`lax.scan` (`samplers.sample(remat=True)`): the backward pass recomputes a step's activations
from the scan's carry, so the memory of a gradient does not grow with the number of steps
beyond two latents per step.

Losses (`Term`s, each per candidate, from the generated latents or from the power spectrogram
of the decoded audio, computed once for all audio terms):

- intensity: MSE (dB^2) between the output's smoothed dB curve (`controls.features.dynamics`)
  and a target curve, over the frames where it is given;
- melody: cross-entropy between the output's soft chroma (a softmax of its max-normalised,
  high-passed chroma at the features' temperature, as `controls.features.melody`) and a
  one-hot pitch-class target, over the target's voiced frames;
- structure: MSE between the cosine self-similarity matrix of the output's pooled features (log
  mel or full-band chroma averaged over `pool` equal spans per section and centred over time)
  and a target: for a pattern such as "AABA", 1 between spans of sections with the same letter
  and 0 elsewhere;
- region (inpainting, outpainting): MSE in the normalised latent space to a reference's latents
  over the frames kept, the rest free;
- loop: MSE between the last `frames` latent frames and the first; the clip cut before that last
  region then repeats without a seam (its end leads into its start as into the region).

The candidates (the batch) are independent: the gradient of the loss summed over candidates has
each candidate's gradient in its own rows, Adam is element-wise, and each candidate keeps the
x_T of its lowest loss (kept on the host, from the losses each iteration returns). One
iteration (sampling, decoding, features, losses, gradient, update) is one jitted call, its
candidates sharded over this host's devices on the batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import parallel
from ldm_jax.config import Section
from ldm_jax.controls import features as control_features
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.schedules import DiffusionError

TASKS = ("intensity", "melody", "structure", "region", "loop")
AUDIO_TASKS = ("intensity", "melody", "structure")
OPTIMISED_SAMPLERS = ("ddim", "dpmpp_2m")
STRUCTURE_FEATURES = ("mel", "chroma")


@dataclasses.dataclass(frozen=True)
class DittoConfig(Section):
    """How DITTO optimises (`from_dict` checks a config section's keys).

    Attributes:
      iterations: Adam steps K at most.
      lr: Adam's learning rate on x_T (whose entries are about unit normal).
      sampler: the deterministic sampler differentiated: "ddim" (eta 0) or "dpmpp_2m".
      sampler_steps: its steps S.
      cfg_scale: classifier-free guidance scale, fixed during the optimisation.
      tolerance: stop once every candidate's loss is at most this (0: run all iterations).
      resample_steps: > 0 also samples the optimised x_T* with this many steps of
        `resample_sampler` (reported beside the optimised sampler's own output).
      resample_sampler: the sampler of that resampling.
      remat: checkpoint every sampler step (memory independent of S); False keeps every
        step's activations (the reference the checkpointed gradient is tested against).
    """

    SECTION: ClassVar[str] = "ditto"
    LABEL: ClassVar[str] = "DITTO config"
    ERROR: ClassVar[type[Exception]] = DiffusionError

    iterations: int = 40
    lr: float = 0.05
    sampler: str = "ddim"
    sampler_steps: int = 10
    cfg_scale: float = 3.0
    tolerance: float = 0.0
    resample_steps: int = 0
    resample_sampler: str = "dpmpp_2m"
    remat: bool = True

    def __post_init__(self):
        if samplers.canonical_sampler(self.sampler) not in OPTIMISED_SAMPLERS:
            raise DiffusionError(f"ditto.sampler={self.sampler!r}: DITTO differentiates a "
                                 f"deterministic sampler, one of {OPTIMISED_SAMPLERS}")
        if samplers.canonical_sampler(self.resample_sampler) == "ddpm":
            raise DiffusionError("ditto.resample_sampler must be deterministic (ddim, "
                                 "dpmpp_2m or euler), not ddpm")
        if self.iterations < 1 or self.sampler_steps < 1 or self.resample_steps < 0:
            raise DiffusionError("ditto.iterations and sampler_steps must be positive and "
                                 "resample_steps >= 0")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise DiffusionError(f"ditto.lr must be a positive number, got {self.lr}")
        if not (np.isfinite(self.tolerance) and self.tolerance >= 0):
            raise DiffusionError(f"ditto.tolerance must be >= 0, got {self.tolerance}")
        if not np.isfinite(self.cfg_scale):
            raise DiffusionError(f"ditto.cfg_scale must be finite, got {self.cfg_scale}")


# ----------------------------------------------------------------------------- loss terms

@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted loss of a DITTO objective.

    Attributes:
      kind: one of TASKS.
      weight: its weight in the sum.
      arrays: the target, float32 arrays with a leading axis of 1 (every candidate) or B.
      size: structure: pooled spans in all; loop: latent frames matched.
      option: structure: the pooled features ("mel" or "chroma").
    """

    kind: str
    weight: float = 1.0
    arrays: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    size: int = 0
    option: str = ""

    def __post_init__(self):
        if self.kind not in TASKS:
            raise DiffusionError(f"unknown DITTO loss {self.kind!r}; use one of {TASKS}")
        if not (np.isfinite(self.weight) and self.weight > 0):
            raise DiffusionError(f"the {self.kind} loss weight must be positive, got "
                                 f"{self.weight}")

    @property
    def static(self) -> tuple:
        """What a compiled objective depends on besides the arrays' values."""
        return (self.kind, float(self.weight), int(self.size), self.option,
                tuple(sorted((k, v.shape) for k, v in self.arrays.items())))


def _batched(x, ndim: int, what: str, dtype=np.float32) -> np.ndarray:
    """x with `ndim` dimensions per candidate, given for one ([...]) or per candidate."""
    x = np.asarray(x, dtype)
    if x.ndim == ndim:
        x = x[None]
    if x.ndim != ndim + 1:
        raise DiffusionError(f"the {what} has shape {x.shape}; give {ndim} axes (or one more "
                             "for one per candidate)")
    return x


def intensity(db, mask=None, weight: float = 1.0) -> Term:
    """The intensity loss toward a dB curve [frames] or [B, frames] at the feature frame rate
    (NaN frames, or where `mask` is False, are free)."""
    db = _batched(db, 1, "intensity target")
    given = np.isfinite(db) if mask is None else (_batched(mask, 1, "intensity mask", bool)
                                                  & np.isfinite(db))
    return Term("intensity", weight, {"db": np.where(given, db, 0.0).astype(np.float32),
                                      "mask": given.astype(np.float32)})


def melody(pitch_class, weight: float = 1.0) -> Term:
    """The melody loss toward pitch classes [frames] or [B, frames] (0..11; -1 = free)."""
    pc = _batched(pitch_class, 1, "melody target", np.int64)
    if pc.max(initial=-1) > 11 or pc.min(initial=0) < -1:
        raise DiffusionError("melody pitch classes must lie in 0..11 (-1 where free)")
    one_hot = (pc[..., None] == np.arange(12)).astype(np.float32)
    return Term("melody", weight, {"one_hot": one_hot, "mask": (pc >= 0).astype(np.float32)})


def structure_matrix(pattern: str, pool: int = 4) -> np.ndarray:
    """The target self-similarity of a section pattern such as "AABA": [P, P] with P =
    len(pattern) * pool, 1 between spans of sections with the same letter, else 0."""
    pattern = str(pattern).strip()
    if len(pattern) < 2 or not pattern.isalpha():
        raise DiffusionError(f"structure pattern {pattern!r}: give two or more section letters "
                             "such as AABA")
    if pool < 1:
        raise DiffusionError(f"structure pool must be positive, got {pool}")
    labels = np.repeat(np.asarray([ord(c) for c in pattern.upper()]), pool)
    return (labels[:, None] == labels[None, :]).astype(np.float32)


def structure(target, weight: float = 1.0, pool: int = 4, features: str = "mel") -> Term:
    """The structure loss toward a pattern string ("AABA") or a self-similarity matrix [P, P]
    or [B, P, P]; `pool` spans per section of a pattern."""
    if features not in STRUCTURE_FEATURES:
        raise DiffusionError(f"structure features {features!r}: use one of "
                             f"{STRUCTURE_FEATURES}")
    matrix = structure_matrix(target, pool) if isinstance(target, str) else target
    matrix = _batched(matrix, 2, "structure target")
    if matrix.shape[1] != matrix.shape[2] or matrix.shape[1] < 2:
        raise DiffusionError(f"a structure target must be square, at least 2 x 2; got "
                             f"{matrix.shape[1:]}")
    return Term("structure", weight, {"ssm": matrix}, size=matrix.shape[1], option=features)


def region(latents, keep, weight: float = 1.0) -> Term:
    """The region loss (inpainting, outpainting): normalised latents [F, D] or [B, F, D] kept
    where `keep` [F] or [B, F] is True."""
    latents = _batched(latents, 2, "region latents")
    keep = _batched(keep, 1, "region mask", bool)
    if not keep.any():
        raise DiffusionError("the region to keep is empty")
    return Term("region", weight, {"latents": latents, "mask": keep.astype(np.float32)})


def loop(frames: int, weight: float = 1.0) -> Term:
    """The loop loss: the last `frames` latent frames match the first."""
    if int(frames) < 1:
        raise DiffusionError(f"the loop region must be at least one latent frame, got {frames}")
    return Term("loop", weight, size=int(frames))


def fit_frames(term: Term, audio_frames: int, latent_frames: int) -> Term:
    """The term with its time axis cut or padded (as free frames) to the clip's frames."""
    if term.kind in ("structure", "loop"):
        if term.kind == "loop" and 2 * term.size >= latent_frames:
            raise DiffusionError(f"the loop region of {term.size} frames needs a clip of more "
                                 f"than {2 * term.size} latent frames")
        if term.kind == "structure" and term.size > audio_frames:
            raise DiffusionError(f"{term.size} structure spans need at least as many feature "
                                 f"frames; the clip has {audio_frames}")
        return term
    frames = latent_frames if term.kind == "region" else audio_frames

    def fit(x):
        have = x.shape[1]
        if have >= frames:
            return x[:, :frames]
        return np.pad(x, [(0, 0), (0, frames - have)] + [(0, 0)] * (x.ndim - 2))

    return dataclasses.replace(term, arrays={k: fit(v) for k, v in term.arrays.items()})


def _masked_mean(err: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(err * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def _pool_matrix(frames: int, spans: int) -> np.ndarray:
    """[spans, frames]: averages frames over `spans` equal spans."""
    which = np.minimum((np.arange(frames) * spans) // frames, spans - 1)
    m = (which[None, :] == np.arange(spans)[:, None]).astype(np.float32)
    return m / m.sum(1, keepdims=True)


def self_similarity(feats: jax.Array, spans: int) -> jax.Array:
    """Cosine self-similarity [B, P, P] of features [B, frames, C] averaged over P spans and
    centred over them."""
    pooled = jnp.einsum("pf,bfc->bpc", jnp.asarray(_pool_matrix(feats.shape[1], spans)), feats)
    centred = pooled - jnp.mean(pooled, axis=1, keepdims=True)
    unit = centred / jnp.sqrt(jnp.sum(centred * centred, axis=-1, keepdims=True) + 1e-8)
    return jnp.einsum("bpc,bqc->bpq", unit, unit)


def structure_features(power: jax.Array, cfg: control_features.FeatureConfig,
                       kind: str) -> jax.Array:
    """The frame features a structure loss pools: log mel [B, frames, n_mels] or chroma."""
    if kind == "chroma":
        return control_features.harmony_from_power(power, cfg)
    from ldm_jax.audio import dsp
    fb = jnp.asarray(dsp.mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels))
    return 10.0 * jnp.log10(jnp.maximum(power @ fb, 1e-10))


def term_losses(terms: Sequence[Term], arrays: Sequence[Mapping[str, jax.Array]],
                latents: jax.Array, audio: jax.Array | None,
                cfg: control_features.FeatureConfig) -> list[jax.Array]:
    """Each term's loss per candidate [B], from the normalised latents [B, F, D] and the mono
    audio [B, samples] (None when no term hears it)."""
    power = coverage = None
    if audio is not None:
        power, coverage = control_features.power_spectrum(audio, cfg)
    out = []
    for term, a in zip(terms, arrays):
        if term.kind == "intensity":
            db = control_features.dynamics_from_power(power, cfg, coverage)["db"]
            loss = _masked_mean(jnp.square(db - a["db"]), a["mask"])
        elif term.kind == "melody":
            chroma = control_features.melody_from_power(power, cfg, coverage)["chroma"]
            logp = jax.nn.log_softmax(chroma / cfg.temperature, axis=-1)
            loss = _masked_mean(-jnp.sum(logp * a["one_hot"], axis=-1), a["mask"])
        elif term.kind == "structure":
            ssm = self_similarity(structure_features(power, cfg, term.option), term.size)
            loss = jnp.mean(jnp.square(ssm - a["ssm"]), axis=(1, 2))
        elif term.kind == "region":
            err = jnp.mean(jnp.square(latents - a["latents"]), axis=-1)
            loss = _masked_mean(err, a["mask"])
        else:
            w = term.size
            loss = jnp.mean(jnp.square(latents[:, -w:] - latents[:, :w]), axis=(1, 2))
        out.append(loss)
    return out


# ----------------------------------------------------------------------------- optimiser

@dataclasses.dataclass
class Problem:
    """A differentiable generation whose initial noise DITTO optimises.

    Attributes:
      sample: `(params, x_T, context, steps, sampler, remat) -> normalised latents [B, F, D]`,
        traceable; `context` is a pytree of per-candidate arrays (conditions, guidance).
      decode: `(decoder_params, latents) -> mono audio [B, samples']`, traceable.
      features: the feature config of the audio losses.
      samples: audio samples per clip (the decoded audio is cut or zero-padded to it).
    """

    sample: Any
    decode: Any
    features: control_features.FeatureConfig
    samples: int


def _objective(problem: Problem, terms: Sequence[Term], config: DittoConfig, steps: int,
               sampler: str, remat: bool):
    hears = any(t.kind in AUDIO_TASKS for t in terms)

    def objective(params, decoder_params, x, context, arrays):
        latents = problem.sample(params, x, context, steps, sampler, remat)
        audio = None
        if hears:
            audio = problem.decode(decoder_params, latents)[:, :problem.samples]
            audio = jnp.pad(audio, [(0, 0), (0, problem.samples - audio.shape[1])])
        parts = term_losses(terms, arrays, latents, audio, problem.features)
        total = sum(t.weight * p for t, p in zip(terms, parts))
        return total, parts, latents

    return objective


def make_step(problem: Problem, terms: Sequence[Term], config: DittoConfig):
    """One DITTO iteration, a pure function to jit:

    `(params, decoder_params, state, context, arrays) -> (state, loss [B], parts [B] per term,
    latents [B, F, D])` with state `{"x", "opt"}`: the losses and latents are those of
    `state["x"]` before the update, the new state holds the Adam-updated x.
    """
    objective = _objective(problem, terms, config, config.sampler_steps, config.sampler,
                           config.remat)
    optimizer = optax.adam(config.lr)

    def step(params, decoder_params, state, context, arrays):
        def summed(x):
            total, parts, latents = objective(params, decoder_params, x, context, arrays)
            return jnp.sum(total), (total, parts, latents)

        (_, (total, parts, latents)), grad = jax.value_and_grad(summed, has_aux=True)(
            state["x"])
        updates, opt = optimizer.update(grad, state["opt"], state["x"])
        return {"x": optax.apply_updates(state["x"], updates), "opt": opt}, total, parts, \
            latents

    return step, optimizer


def init_state(optimizer, x: jax.Array) -> dict:
    """The optimisation state at x_T = x."""
    return {"x": x, "opt": optimizer.init(x)}


class _Best:
    """Each candidate's best x_T so far, with its loss, per-term losses and latents (host)."""

    def __init__(self):
        self.value = None

    def keep(self, x, total, parts, latents):
        new = {"x": np.asarray(x), "loss": total, "terms": parts, "latents": latents}
        if self.value is None:
            self.value = new
            return
        old = self.value
        better = (total < old["loss"]) | (np.isnan(old["loss"]) & ~np.isnan(total))

        def pick(a, b):
            return np.where(better.reshape((-1,) + (1,) * (np.ndim(a) - 1)), a, b)

        self.value = {"x": pick(new["x"], old["x"]), "loss": pick(total, old["loss"]),
                      "terms": {k: pick(v, old["terms"][k]) for k, v in parts.items()},
                      "latents": pick(latents, old["latents"])}


class _Compiled:
    """A jitted function compiled once for its arguments' shapes and shardings; later calls
    place their arguments as the compiled code expects."""

    def __init__(self, fn, *args):
        start = time.perf_counter()
        self.compiled = jax.jit(fn).lower(*args).compile()
        self.seconds = time.perf_counter() - start
        self.memory = parallel.memory_estimate(self.compiled)

    def __call__(self, *args):
        args = jax.device_put(args, self.compiled.input_shardings[0])
        return self.compiled(*args)


def _compile(cache: dict | None, key: tuple, make, *args) -> tuple[_Compiled, float]:
    """(the compiled `make()` for ARGS, the seconds compiling took now): from CACHE when
    it holds KEY with these argument shapes."""
    leaves, treedef = jax.tree.flatten(args)
    key = (key, treedef, tuple((np.shape(x), str(np.result_type(x))) for x in leaves))
    if cache is not None and key in cache:
        return cache[key], 0.0
    compiled = _Compiled(make(), *args)
    if cache is not None:
        cache[key] = compiled
    return compiled, compiled.seconds


def _placement(batch: int):
    """Puts a pytree on this host's devices: leaves whose leading axis is the batch of
    candidates sharded on the batch axes where it divides evenly, the rest replicated."""
    mesh = parallel.make_mesh(None, jax.local_devices())
    shards = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(tree):
        def one(x):
            x = jnp.asarray(x)
            split = x.ndim >= 1 and x.shape[0] == batch and batch % shards == 0
            return jax.device_put(x, parallel.batch_sharding(mesh, x.ndim) if split
                                  else parallel.replicated(mesh))
        return jax.tree.map(one, tree)

    return put


def optimise(problem: Problem, terms: Sequence[Term], x_T, params, decoder_params, context,
             config: DittoConfig, *, progress: bool = False, desc: str = "ditto",
             cache: dict | None = None) -> dict:
    """Optimises the initial noise of a generation (the DITTO loop).

    Args:
      problem: the differentiable generation (`Problem`).
      terms: the losses, fitted to the clip's frames (`fit_frames`).
      x_T: the starting noise [B, F, D] (the seeds' noise of plain sampling).
      params: the denoiser's parameters; decoder_params: the decoder's.
      context: per-candidate conditions and guidance (a pytree `problem.sample` takes).
      config: the `DittoConfig`.
      progress: show a progress bar with the mean loss.
      desc: its label.
      cache: compiled functions kept between calls on the same `problem` (a dict owned by
        the caller; None compiles anew).

    Returns:
      {"latents": the optimised sampler's output at each candidate's best x_T [B, F, D],
       "x_T": that best x_T, "loss": its loss [B], "terms": its per-term losses {kind: [B]},
       "initial_latents" / "initial_loss" / "initial_terms": plain sampling's (x_T as given),
       "history": the loss of every x_T scored [k, B] (the last update's too, unless stopped
       early), "iterations": Adam steps taken,
       "stopped_early": bool, "compile_seconds", "seconds" (the iterations' wall time),
       "memory_bytes": XLA's estimate for one iteration (None without one); with
       `config.resample_steps`, "resampled_latents", "resampled_loss", "resampled_terms" (x_T*
       sampled again with more steps), "initial_resampled_loss" and
       "initial_resampled_latents" (x_T likewise)}.
    """
    from tqdm.auto import tqdm

    terms = list(terms)
    if not terms:
        raise DiffusionError("DITTO needs at least one loss (a target to optimise toward)")
    names = [t.kind for t in terms]
    x_T = jnp.asarray(x_T, jnp.float32)
    put = _placement(x_T.shape[0])
    step, optimizer = make_step(problem, terms, config)
    arrays, context = put([dict(t.arrays) for t in terms]), put(context)
    params, decoder_params = put(params), put(decoder_params)
    state = put(init_state(optimizer, x_T))
    statics = tuple(t.static for t in terms)
    compiled, compile_seconds = _compile(
        cache, ("step", statics, config.lr, config.sampler, config.sampler_steps, config.remat),
        lambda: step, params, decoder_params, state, context, arrays)
    evaluate, seconds = _compile(
        cache, ("evaluate", statics, config.sampler, config.sampler_steps), lambda: _objective(
            problem, terms, config, config.sampler_steps, config.sampler, False),
        params, decoder_params, state["x"], context, arrays)
    compile_seconds += seconds

    def scored(outputs):
        total, parts, latents = outputs
        return np.asarray(total), dict(zip(names, map(np.asarray, parts))), np.asarray(latents)

    history, initial, best, start = [], None, _Best(), time.perf_counter()
    bar = tqdm(range(config.iterations), desc=desc, disable=not progress, leave=False)
    stopped = False
    for _ in bar:
        x = state["x"]
        state, *outputs = compiled(params, decoder_params, state, context, arrays)
        total, parts, latents = scored(outputs)
        history.append(total)
        best.keep(x, total, parts, latents)
        initial = initial or (total, parts, latents)
        bar.set_postfix(loss=f"{float(np.mean(total)):.4g}",
                        best=f"{float(np.mean(best.value['loss'])):.4g}")
        if config.tolerance > 0 and np.all(total <= config.tolerance):
            stopped = True
            break
    iterations = len(history) - stopped
    if not stopped:  # the last update is scored too
        total, parts, latents = scored(evaluate(params, decoder_params, state["x"], context,
                                                arrays))
        history.append(total)
        best.keep(state["x"], total, parts, latents)
    seconds = time.perf_counter() - start
    b = best.value
    best_x = put(b["x"])
    out = {"latents": b["latents"], "x_T": b["x"], "loss": b["loss"], "terms": b["terms"],
           "initial_latents": initial[2], "initial_loss": initial[0],
           "initial_terms": initial[1], "history": np.stack(history), "iterations": iterations,
           "stopped_early": stopped, "compile_seconds": compile_seconds,
           "seconds": seconds, "memory_bytes": compiled.memory}
    if config.resample_steps:
        again, seconds = _compile(
            cache, ("resample", statics, config.resample_sampler, config.resample_steps),
            lambda: _objective(
                problem, terms, config, config.resample_steps, config.resample_sampler, False),
            params, decoder_params, best_x, context, arrays)
        out["compile_seconds"] += seconds
        total, parts, latents = scored(again(params, decoder_params, best_x, context, arrays))
        out.update(resampled_latents=latents, resampled_loss=total, resampled_terms=parts)
        total, _, latents = scored(again(params, decoder_params, put(x_T), context, arrays))
        out.update(initial_resampled_loss=total, initial_resampled_latents=latents)
    return out


# ----------------------------------------------------------------------------- trained chain

def feature_config(gen) -> control_features.FeatureConfig:
    """The control features of a trained chain: W/config.json's `controls.features` where
    there is one (its frame rate 0: the latent frame rate), else the defaults at the codec's
    sample rate and the latent frame rate."""
    import json
    import os

    from ldm_jax import paths

    section = {}
    if gen.root is not None:
        path = os.path.join(gen.root, "config.json")
        if paths.isfile(path):
            section = (json.loads(paths.read_text(path)).get("controls") or {}).get("features")
    return control_features.FeatureConfig.from_section(
        section, sample_rate=gen.sample_rate, frame_rate=gen.stats.frame_rate)


def control_terms(controls: Mapping, frame_rate: float, weights: Mapping | None = None,
                  ranges: Mapping | None = None) -> list[Term]:
    """Loss terms from controls in the form of `ldm_jax.controls` (`controls_from_file` of a
    reference clip, a MIDI file or a CSV curve): "dynamics" -> intensity, "melody" -> melody.
    `weights` maps those names to loss weights (default 1); `ranges` maps them to `(start,
    end)` seconds where they are followed (end None: to the end), the rest free."""
    weights, ranges = dict(weights or {}), dict(ranges or {})
    out = []
    for name, found in controls.items():
        if name not in ("dynamics", "melody"):
            raise DiffusionError(f"DITTO takes dynamics and melody controls, not {name!r}")
        if name not in found:
            raise DiffusionError(f"the {name} control given holds no {name}")
        rate = float(found.get("frame_rate", frame_rate))
        if abs(rate - frame_rate) > 1e-6 * frame_rate:
            raise DiffusionError(f"the {name} control is at {rate:g} frames/s, the features at "
                                 f"{frame_rate:g}")
        w = float(weights.get(name, 1.0))
        values = np.asarray(found["dynamics"]["db"] if name == "dynamics" else
                            found["melody"]["pitch_class"])
        start, end = ranges.get(name, (0.0, None))
        t = np.arange(values.shape[-1]) / frame_rate
        inside = (t >= float(start or 0.0)) & (True if end is None else t < float(end))
        if not inside.any():
            raise DiffusionError(f"the {name} range [{start}, {end}] s holds no frame of the "
                                 "control")
        out.append(intensity(values, mask=inside, weight=w) if name == "dynamics" else
                   melody(np.where(inside, values, -1), weight=w))
    return out


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Ditto:
    """DITTO over a trained chain (a `generate.Generator`): its U-Net, CLAP conditions,
    guidance and codec decoder.

    Attributes:
      gen: the Generator.
      features: the `FeatureConfig` of the audio losses (its sample rate is the codec's).
    """

    def __init__(self, generator, features: control_features.FeatureConfig | None = None):
        self.gen = generator
        self.features = features or feature_config(generator)
        self._problems, self._compiled = {}, {}
        if self.features.sample_rate != generator.sample_rate:
            raise DiffusionError(f"the features are at {self.features.sample_rate} Hz, the "
                                 f"codec at {generator.sample_rate} Hz")

    def problem(self, samples: int, guided: bool) -> Problem:
        """The generation DITTO differentiates: guided sampling over the U-Net, then the codec
        decoder (mono); one object per setting, so that compiled steps are reused."""
        from ldm_jax.codec.model import Codec

        if (samples, guided) in self._problems:
            return self._problems[samples, guided]

        gen = self.gen

        def sample(params, x, context, steps, sampler, remat):
            fn = gen.model_fn(params, context["cond"], context["uncond"], context["scale"],
                              guided=guided)
            return samplers.sample(sampler, fn, x, gen.schedule, steps, gen.objective,
                                   remat=remat)

        def decode(decoder_params, latents):
            z = gen.stats.denormalize(latents, gen.normalize)
            return jnp.mean(gen.codec.codec.apply(decoder_params, z, None, method=Codec.decode),
                            axis=-1)

        problem = Problem(sample=sample, decode=decode, features=self.features,
                          samples=samples)
        self._problems[samples, guided] = problem
        return problem

    @classmethod
    def of(cls, generator) -> Ditto:
        """The DITTO runner of a Generator, made once while the Generator lives (with its
        compiled steps)."""
        if generator not in _RUNNERS:
            _RUNNERS[generator] = cls(generator)
        return _RUNNERS[generator]

    def seconds_or_default(self, seconds: float | None) -> float:
        if seconds is None:
            if self.gen.default_seconds is None:
                raise DiffusionError("give seconds: this model's config records no training "
                                     "length (data.crop_seconds)")
            return self.gen.default_seconds
        if not (np.isfinite(float(seconds)) and float(seconds) > 0):
            raise DiffusionError(f"seconds must be a positive number, got {seconds}")
        return float(seconds)

    def frames(self, seconds: float) -> tuple[int, int, int]:
        """(latent frames, audio samples, feature frames) of a clip of `seconds`."""
        samples = int(round(seconds * self.gen.sample_rate))
        return self.gen.frames_for(seconds), samples, self.features.num_frames(samples)

    def run(self, prompts: str | Sequence[str], terms: Sequence[Term], *,
            config: DittoConfig | None = None, seconds: float | None = None,
            seed: int | Sequence[int] = 0, negative_prompt: str | None = None,
            progress: bool = False, x_T=None) -> dict:
        """Optimises the initial noise of one clip per prompt toward the terms' targets.

        Args:
          prompts: a prompt or B prompts (the candidates; one target for all or one each).
          terms: the losses (`intensity`, `melody`, `structure`, `region`, `loop`,
            `control_terms`), on the clip's feature frames (audio losses) or latent frames
            (region); longer targets are cut, shorter ones leave the rest free.
          config: the `DittoConfig` (default: its defaults).
          seconds: clip length (default: the U-Net's training length).
          seed: an int (prompt i: seed + i) or one per prompt; x_T of plain sampling.
          negative_prompt: the unconditional branch's condition.
          progress: a progress bar with the loss.
          x_T: the starting noise [B, frames, D] (default: the seeds' noise).

        Returns:
          `optimise`'s result with the audio: "audio" (the optimised clips [B, samples]),
          "initial_audio" (plain sampling's), "resampled_audio" and "initial_resampled_audio"
          where resampled; and
          "seconds_per_iteration", "clip_seconds", "prompts", "seeds".
        """
        from ldm_jax.diffusion.generate import prompts_and_seeds

        config = config or DittoConfig()
        gen = self.gen
        prompts, seeds = prompts_and_seeds(prompts, seed)
        n = len(prompts)
        seconds = self.seconds_or_default(seconds)
        frames, samples, feature_frames = self.frames(seconds)
        terms = [fit_frames(t, feature_frames, frames) for t in terms]
        for t in terms:
            for v in t.arrays.values():
                if v.shape[0] not in (1, n):
                    raise DiffusionError(f"the {t.kind} target has {v.shape[0]} rows for {n} "
                                         "prompts; give one for all or one per prompt")
        cond = gen.condition(prompts)
        negative = gen.condition([negative_prompt]) if negative_prompt else None
        guided = float(config.cfg_scale) != 1.0
        context = {"cond": cond, "uncond": gen.unconditional(cond, negative),
                   "scale": np.float32(config.cfg_scale)}
        if x_T is None:
            x_T = gen.initial_noise(seeds, frames)
        elif np.shape(x_T) != (n, frames, gen.stats.latent_dim):
            raise DiffusionError(f"x_T has shape {np.shape(x_T)}; the clips need "
                                 f"{(n, frames, gen.stats.latent_dim)}")
        problem = self.problem(samples, guided)
        out = optimise(problem, terms, x_T, gen.params, gen.codec.variables, context, config,
                       progress=progress, cache=self._compiled.setdefault(id(problem), {}))
        for key in ("latents", "initial_latents", "resampled_latents",
                    "initial_resampled_latents"):
            if key in out:
                out[key.replace("latents", "audio")] = gen.latents_to_audio(out[key], samples)
        out.update(seconds_per_iteration=out["seconds"] / max(out["iterations"], 1),
                   clip_seconds=seconds, prompts=prompts, seeds=seeds)
        return out

    def targets(self, *, seconds: float, controls: Mapping | None = None,
                control_ranges: Mapping | None = None, structure_pattern: str | None = None,
                loop_seconds: float | None = None,
                outpaint_audio=None, outpaint_seconds: float | None = None, inpaint_audio=None,
                inpaint_start: float | None = None, inpaint_end: float | None = None,
                weights: Mapping | None = None) -> tuple[list[Term], dict]:
        """The loss terms of the tasks asked for, and what assembling the output needs.

        Args:
          seconds: the clip length.
          controls: `{"dynamics": ..., "melody": ...}` in the form of `ldm_jax.controls`.
          control_ranges: `{name: (start, end)}` seconds where a control is followed.
          structure_pattern: a section pattern such as "AABA".
          loop_seconds: make the clip loop, matching its last `loop_seconds` to its start.
          outpaint_audio: a mono clip at the codec's rate to continue: the output's first
            `outpaint_seconds` (default: half the clip, at most the reference) match its end.
          inpaint_audio: a mono clip whose latents outside [inpaint_start, inpaint_end] seconds
            are kept.
          weights: loss weights by task name ("dynamics", "melody", "structure", "loop",
            "outpaint", "inpaint"; default 1).

        Returns:
          (terms, plan) where plan says how `output` assembles the clip.
        """
        gen, rate = self.gen, self.gen.stats.frame_rate
        weights = dict(weights or {})
        frames, _, _ = self.frames(seconds)
        terms = control_terms(controls or {}, self.features.frame_rate, weights,
                              control_ranges)
        plan: dict[str, Any] = {}
        if structure_pattern:
            terms.append(structure(structure_pattern, weights.get("structure", 1.0)))
        if loop_seconds is not None:
            w = int(round(float(loop_seconds) * rate))
            terms.append(loop(w, weights.get("loop", 1.0)))
            plan["loop_frames"] = w
        if outpaint_audio is not None and inpaint_audio is not None:
            raise DiffusionError("give either an audio to outpaint or one to inpaint, not both")
        if outpaint_audio is not None:
            clip = np.asarray(outpaint_audio, np.float32).reshape(-1)
            have = -(-len(clip) // gen.codec.config.hop_length)
            reference = gen.encode_audio([clip], have)[0][0]
            keep_s = min(seconds / 2, len(clip) / gen.sample_rate) if outpaint_seconds is None \
                else float(outpaint_seconds)
            w = int(round(keep_s * rate))
            if not 1 <= w <= min(have, frames - 1):
                raise DiffusionError(f"the outpainting overlap of {keep_s:g} s must be shorter "
                                     f"than the clip ({seconds:g} s) and the reference "
                                     f"({len(clip) / gen.sample_rate:.2f} s)")
            known = np.zeros((frames, reference.shape[-1]), np.float32)
            known[:w] = reference[have - w:]
            keep = np.arange(frames) < w
            terms.append(region(known, keep, weights.get("outpaint", 1.0)))
            plan.update(outpaint_reference=reference[:have - w], outpaint_frames=w)
        if inpaint_audio is not None:
            known, have = gen.encode_audio([np.asarray(inpaint_audio, np.float32).reshape(-1)],
                                           frames)
            start = 0.0 if inpaint_start is None else float(inpaint_start)
            end = seconds if inpaint_end is None else float(inpaint_end)
            if not 0.0 <= start < end:
                raise DiffusionError(f"inpaint range [{start}, {end}] s is empty or negative")
            keep = have[0].copy()
            keep[int(np.floor(start * rate)):int(np.ceil(end * rate))] = False
            terms.append(region(known[0], keep, weights.get("inpaint", 1.0)))
        if not terms:
            raise DiffusionError("nothing to optimise toward: give a control, a structure, "
                                 "--loop, an audio to outpaint or one to inpaint")
        return terms, plan

    def output(self, result: dict, plan: Mapping) -> np.ndarray:
        """The clips a user keeps [B, samples']: the optimised audio; for a loop, cut where
        its matched end region begins and crossfaded there (`loop_audio`); for outpainting,
        the reference's latents before the overlap followed by the optimised ones, decoded
        together."""
        gen = self.gen
        latents = result["latents"]
        if "loop_frames" in plan:
            return loop_audio(result["audio"], plan["loop_frames"], latents.shape[1],
                              gen.stats.frame_rate, gen.sample_rate)
        if "outpaint_reference" in plan:
            before = np.broadcast_to(plan["outpaint_reference"][None],
                                     (latents.shape[0],) + plan["outpaint_reference"].shape)
            joined = np.concatenate([before, latents], axis=1)
            seconds = before.shape[1] / gen.stats.frame_rate + result["clip_seconds"]
            return gen.latents_to_audio(joined, int(round(seconds * gen.sample_rate)))
        return result["audio"]


def loop_audio(audio, loop_frames: int, frames: int, frame_rate: float, sample_rate: int
               ) -> np.ndarray:
    """Loops [B, samples'] of clips [B, samples] decoded from `frames` latent frames whose last
    `loop_frames` were matched to their first: each cut where that region begins and, over the
    region's length, faded from what followed the cut into its own start
    (`eval.seams.crossfade_loop`: the two sound alike once matched; the fade hides their
    phases)."""
    from ldm_jax.eval.seams import crossfade_loop

    cut = int(round((frames - loop_frames) / frame_rate * sample_rate))
    fade = int(round(loop_frames / frame_rate * sample_rate))
    return np.stack([crossfade_loop(a, cut, fade) for a in np.asarray(audio)])


def ditto(prompts: str | Sequence[str], *, workdir: str, seconds: float | None = None,
          controls: Mapping | None = None, control_ranges: Mapping | None = None,
          structure_pattern: str | None = None, loop_seconds: float | None = None,
          outpaint_audio=None, outpaint_seconds: float | None = None, inpaint_audio=None,
          inpaint_start: float | None = None, inpaint_end: float | None = None,
          weights: Mapping | None = None, config: DittoConfig | None = None,
          seed: int | Sequence[int] = 0, negative_prompt: str | None = None,
          progress: bool = False, generator=None) -> dict:
    """DITTO with the chain trained in WORKDIR: optimises each prompt's initial noise toward
    the targets given, without training anything.

    Args:
      prompts: a prompt or a list of them (each optimised on its own).
      workdir: W with the trained codec, CLAP and LDM.
      seconds: clip length (default: the U-Net's training length).
      controls, control_ranges, structure_pattern, loop_seconds, outpaint_audio,
        outpaint_seconds, inpaint_audio, inpaint_start, inpaint_end, weights: the targets
        (`Ditto.targets`).
      config: a `DittoConfig` (iterations, lr, sampler, sampler_steps, cfg_scale, tolerance,
        resample_steps).
      seed: prompt i starts from the noise of seed + i (plain sampling's).
      negative_prompt: the unconditional branch's condition.
      progress: a progress bar with the loss.
      generator: a `generate.Generator` to reuse (default: the cached one of W).

    Returns:
      `Ditto.run`'s result with "output": the clips to keep [B, samples'] (`Ditto.output`).
    """
    from ldm_jax.diffusion import generate

    runner = Ditto.of(generator or generate.get_generator(workdir))
    seconds = runner.seconds_or_default(seconds)
    terms, plan = runner.targets(
        seconds=seconds, controls=controls, control_ranges=control_ranges,
        structure_pattern=structure_pattern,
        loop_seconds=loop_seconds, outpaint_audio=outpaint_audio,
        outpaint_seconds=outpaint_seconds, inpaint_audio=inpaint_audio,
        inpaint_start=inpaint_start, inpaint_end=inpaint_end, weights=weights)
    result = runner.run(prompts, terms, config=config, seconds=seconds, seed=seed,
                        negative_prompt=negative_prompt, progress=progress)
    result["output"] = runner.output(result, plan)
    return result


def audio_losses(terms: Sequence[Term], audio, cfg: control_features.FeatureConfig
                 ) -> list[np.ndarray]:
    """The audio terms' losses [B] of clips [B, samples] (e.g. another generator's outputs,
    scored as DITTO scores its own)."""
    terms = [t for t in terms if t.kind in AUDIO_TASKS]
    fn = _audio_loss_fn(tuple((t.kind, t.size, t.option) for t in terms), cfg)
    return [np.asarray(v) for v in fn([dict(t.arrays) for t in terms],
                                      jnp.asarray(audio, jnp.float32))]


@functools.lru_cache(maxsize=32)
def _audio_loss_fn(kinds: tuple, cfg: control_features.FeatureConfig):
    """`term_losses` of audio alone, jitted once per kind of terms and features."""
    shells = [Term(kind, size=size, option=option) for kind, size, option in kinds]
    return jax.jit(lambda arrays, audio: term_losses(shells, arrays, None, audio, cfg))
