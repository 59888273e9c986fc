"""The benchmark suite: input pipeline, codec, CLAP, U-Net train step and sampling speed.

`ldm-jax bench TARGET --preset P --json OUT.json` runs one target (`bench all`: every target on
its CPU-sized preset). Each measured function is compiled ahead of time
(`jax.jit(f).lower(*args).compile()`, timed as `compile_s`), called once untimed, then `repeats`
times, each call ended by `jax.block_until_ready`; the median, min and max are reported. FLOPs
come from XLA's cost analysis, MFU from the peak of `benchmarks.hardware`, and everything runs
on one device (`jax.devices()[0]`) with random inputs of the shapes training and generation use,
so no trained model or dataset is needed (`data` builds its dataset in a temporary directory).
With `--peer`, `unet` and `codec` also time their PyTorch peer (`benchmarks/peers`) on the same
device in the same process and record our examples/s over the peer's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import hardware, inputs, timing
from ldm_jax import config as config_lib
from ldm_jax.config import ConfigError

TARGETS = ("data", "codec", "clap", "unet", "sample")
CPU_PRESETS = {"data": "tiny", "codec": "codec_tiny", "clap": "clap_tiny", "unet": "ldm_tiny",
               "sample": "ldm_tiny"}
ACCELERATOR_PRESETS = {"data": "tiny", "codec": "codec:dac_44khz", "clap": "clap_base",
                       "unet": "ldm_base", "sample": "ldm_base"}
DEFAULT_SECONDS = 10.0
# `bench all` samples clips as long as ldm_tiny's (10 s take minutes per clip on a CPU).
ALL_SAMPLE_SECONDS = 2.0


@dataclasses.dataclass
class Options:
    """What to measure. None takes the preset's or the platform's default.

    Attributes:
      preset: experiment name or file (`ldm_tiny`, `codec:dac_44khz`, `path/exp.py`).
      overrides: `section.key=value` config overrides.
      batch: batch size (default: the preset's `train.batch_size`; data without one: 32).
      repeats: timed calls (default 5 on CPU, 20 on accelerators; data: 40 batches).
      peak_tflops: the device's peak in TFLOP/s, instead of the table's.
      seconds: audio length for codec encode/decode and for sampling (default 10; `run_all`
        samples `ALL_SAMPLE_SECONDS`).
      max_batch: sampling doubles the batch from 1 up to this (default 4 on CPU, 64 elsewhere).
      steps: sampler steps.
      sampler: sampler name.
      dtype: compute dtype override ("float32" or "bfloat16").
      remat: rematerialisation override (models that have the option: CLAP, U-Net).
      frame_rate: latent frames per second (default: the paired codec's).
      codec: codec experiment paired with an LDM preset (default: `PAIRED_CODECS`).
      data_dir: an existing TFDS directory for `data` (built there if it holds no dataset).
      compiler_options: XLA options for every compilation, e.g.
        {"xla_backend_optimization_level": 0} to check the suite quickly; timings then are not
        those of XLA's default build (recorded in the JSON).
      peer: also time the PyTorch peer of the target (`PEERS`) on the same device, in this
        process, after the JAX step.
      peer_threads: torch intra-op threads for a CPU peer (default: torch's own).
    """

    preset: str | None = None
    overrides: tuple[str, ...] = ()
    batch: int | None = None
    repeats: int | None = None
    peak_tflops: float | None = None
    seconds: float | None = None
    max_batch: int | None = None
    steps: int = 50
    sampler: str = "dpmpp_2m"
    dtype: str | None = None
    remat: bool | None = None
    frame_rate: float | None = None
    codec: str | None = None
    data_dir: str | None = None
    compiler_options: dict | None = None
    peer: bool = False
    peer_threads: int | None = None


def on_accelerator() -> bool:
    return jax.devices()[0].platform != "cpu"


def default_preset(target: str) -> str:
    return (ACCELERATOR_PRESETS if on_accelerator() else CPU_PRESETS)[target]


def _repeats(opts: Options, default_cpu: int = 5, default_accelerator: int = 20) -> int:
    if opts.repeats is not None:
        if opts.repeats < 1:
            raise ConfigError(f"--repeats {opts.repeats}: give at least 1")
        return int(opts.repeats)
    return default_accelerator if on_accelerator() else default_cpu


def load_stage(opts: Options, target: str, stage: str, model_key: str):
    """(preset spec, full config, the stage's config) with --dtype / --remat applied.

    A chain experiment's stage is its `stage` section; any other experiment is the stage itself,
    and must have `model.<model_key>` (so `bench unet --preset codec_tiny` is a one-line error).
    """
    spec = opts.preset or default_preset(target)
    cfg = config_lib.get_config(spec, list(opts.overrides))
    if stage in cfg and "model" in cfg[stage]:
        section = cfg[stage]
    elif stage == "data" or model_key in cfg.get("model", {}):
        section = cfg
    else:
        raise ConfigError(f"preset {spec!r} has no {stage} model; use one such as "
                          f"{CPU_PRESETS[target]} or {ACCELERATOR_PRESETS[target]}")
    if "model" in section:
        with section.unlocked():
            if opts.dtype is not None:
                if opts.dtype not in ("float32", "bfloat16"):
                    raise ConfigError(f"--dtype {opts.dtype!r}: use float32 or bfloat16")
                section.model.dtype = opts.dtype
            if opts.remat is not None:
                if "remat" not in section.model:
                    raise ConfigError(f"the {stage} model has no remat option; drop --remat")
                section.model.remat = bool(opts.remat)
    return spec, cfg, section


def _record(target: str, spec: str, opts: Options, section, **fields) -> dict:
    model = section.get("model", {})
    return {"target": target, "preset": spec, "overrides": list(opts.overrides),
            **hardware.environment(), "dtype": model.get("dtype"), "remat": model.get("remat"),
            "compiler_options": opts.compiler_options, **fields}


def param_count(tree) -> int:
    """Scalars in a pytree of arrays or shapes."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


@dataclasses.dataclass(frozen=True)
class Meter:
    """How a target compiles and times its functions.

    Attributes:
      repeats: timed calls after one untimed warm-up call.
      peak_flops: the device's peak FLOP/s (None: MFU is not computed).
      compiler_options: XLA options for every compilation (None: XLA's defaults).
    """

    repeats: int
    peak_flops: float | None
    compiler_options: dict | None = None

    def compile(self, fn, *args, donate=()):
        """(compiled, lowered, seconds): see `timing.compile_jit`."""
        return timing.compile_jit(fn, *args, donate_argnums=donate,
                                  compiler_options=self.compiler_options)

    def call(self, fn, *args):
        """`fn(*args)` compiled with the meter's options, once, untimed (initialisation)."""
        return self.compile(fn, *args)[0](*args)

    def __call__(self, fn, *args, examples: int, donate=(), threads_state: bool = False):
        """Compiles and times one function.

        Args:
          fn: the function; with `threads_state`, a `state, *rest -> (state, metrics)` step
            whose state (argument 0) is threaded through the calls.
          *args: its arguments.
          examples: examples one call processes (for examples/s).
          donate: donated argument positions.

        Returns:
          (last output (the final state of a step), metrics: compile_s, step_s {median, min,
          max}, examples_per_s, flops_per_step, flops_per_s, mfu, peak_memory_bytes,
          peak_memory_source).
        """
        # Inputs live on the device before timing: host transfers are the input pipeline's.
        args = jax.device_put(args)
        compiled, _, compile_s = self.compile(fn, *args, donate=donate)
        flops = hardware.cost_flops(compiled.cost_analysis())
        timer = timing.time_steps if threads_state else timing.time_calls
        out, times = timer(compiled, *args, repeats=self.repeats)
        step = timing.summarize(times)
        memory, source = hardware.peak_memory(compiled)
        return out, {"compile_s": compile_s, "step_s": step,
                     "examples_per_s": examples / step["median"], "flops_per_step": flops,
                     "flops_per_s": flops / step["median"] if flops else None,
                     "mfu": hardware.mfu(flops, step["median"], self.peak_flops),
                     "peak_memory_bytes": memory, "peak_memory_source": source}


def peak_fields(opts: Options) -> dict:
    """The record's peak_flops and peak_flops_source for the first device."""
    value, source = hardware.peak_flops(jax.devices()[0].device_kind, opts.peak_tflops)
    return {"peak_flops": value, "peak_flops_source": source}


def make_meter(opts: Options, cpu_repeats: int = 5, accelerator_repeats: int = 20
               ) -> tuple[Meter, dict]:
    """The target's Meter and its `peak_fields`."""
    peak = peak_fields(opts)
    meter = Meter(_repeats(opts, cpu_repeats, accelerator_repeats), peak["peak_flops"],
                  opts.compiler_options)
    return meter, peak


# ------------------------------------------------------------------------------------ peers

# Targets with a PyTorch peer in `benchmarks/peers` (the same network and train step).
PEERS = {"unet": "unet_torch", "codec": "dac_torch"}


def peer_device(platform: str, environ=None) -> str:
    """The torch device beside JAX's first device.

    Args:
      platform: `jax.devices()[0].platform`.
      environ: the environment (default `os.environ`).

    Returns:
      "cpu" or "cuda".

    Raises:
      ConfigError: on a platform torch cannot share, or a GPU that JAX preallocates.
    """
    environ = os.environ if environ is None else environ
    if platform == "cpu":
        return "cpu"
    if platform in ("gpu", "cuda"):
        # JAX takes 75% of the GPU at start-up; the peer would run out of memory or be cramped.
        if (environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() not in ("false", "0")
                and not environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")):
            raise ConfigError("--peer shares the GPU with JAX: run with "
                              "XLA_PYTHON_CLIENT_PREALLOCATE=false")
        return "cuda"
    raise ConfigError(f"the PyTorch peers run on CPUs and CUDA GPUs, not {platform}; drop --peer")


def load_peer(opts: Options, target: str) -> types.SimpleNamespace | None:
    """The target's peer module and device when --peer is given, checked before any timing.

    Returns:
      None without --peer; else a namespace of module (`benchmarks.peers.*`) and device.

    Raises:
      ConfigError: a thread count below 1, PyTorch missing, or a device it cannot use.
    """
    if not opts.peer:
        return None
    if opts.peer_threads is not None and opts.peer_threads < 1:
        raise ConfigError(f"--peer-threads {opts.peer_threads}: give at least 1")
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ConfigError("--peer needs PyTorch: pip install torch (the CPU wheel on CPU "
                          "hosts), then pip install -e '.[peers]'") from e
    import importlib

    module = importlib.import_module(f"benchmarks.peers.{PEERS[target]}")
    return types.SimpleNamespace(module=module, device=peer_device(jax.devices()[0].platform))


def run_peer(peer: types.SimpleNamespace, opts: Options, ours: dict, **kwargs) -> dict:
    """Times the peer's `benchmark(**kwargs, device=...)` and compares it with our step.

    Args:
      peer: `load_peer`'s namespace.
      opts: the options (`peer_threads`).
      ours: our step's metrics (`examples_per_s`).
      **kwargs: the peer's `benchmark` arguments other than the device.

    Returns:
      {"peer": the peer's record plus its torch threads, "speed_ratio_vs_peer": our
       examples/s over the peer's (above 1: ours is faster)}.
    """
    import torch

    threads = torch.get_num_threads()
    if opts.peer_threads is not None:
        torch.set_num_threads(int(opts.peer_threads))
    try:
        record = peer.module.benchmark(**kwargs, device=peer.device)
        record["threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    record["module"] = peer.module.__name__
    return {"peer": record,
            "speed_ratio_vs_peer": ours["examples_per_s"] / record["examples_per_s"]}


# ------------------------------------------------------------------------------------ data

def pipeline_batch_times(source, data_cfg, *, batch_size: int, crop_seconds: float,
                         workers: int, batches: int, warmup: int) -> tuple[list[float], int]:
    """Seconds per batch of the grain training pipeline (shuffle, crop, batch) after `warmup`
    batches (worker start-up falls in the warm-up), and the bytes of audio delivered."""
    from ldm_jax.data import pipeline

    it = pipeline.make_iterator(source, data_cfg, batch_size=batch_size, seed=0, process_index=0,
                                process_count=1, crop_seconds=crop_seconds,
                                worker_count=workers, fields=("audio", "caption"))
    for _ in range(warmup):
        next(it)
    times, nbytes = [], 0
    for _ in range(batches):
        start = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - start)
        nbytes += batch["audio"].nbytes
    if hasattr(it, "close"):
        it.close()
    return times, nbytes


def bench_data(opts: Options) -> dict:
    """Clips/s of the input pipeline over the preset's `data` section (synthetic_music built into
    a temporary directory unless --data-dir holds it); one step is one batch, and examples/s is
    over all `repeats` batches."""
    from ldm_jax.data import builders

    spec, cfg, section = load_stage(opts, "data", "data", "")
    data_cfg = section.data
    batch = opts.batch or int(section.train.batch_size if "train" in section else 32)
    repeats = _repeats(opts, 40, 40)
    crop = float(data_cfg.crop_seconds)
    with tempfile.TemporaryDirectory(prefix="ldm_jax_bench_") as tmp:
        data_dir = opts.data_dir or tmp
        start = time.perf_counter()
        builders.build(data_cfg.name, data_cfg, data_dir, print_fn=None)
        build_s = time.perf_counter() - start
        source = builders.open_split(data_dir, data_cfg.name, "train")
        times, nbytes = pipeline_batch_times(
            source, data_cfg, batch_size=batch, crop_seconds=crop,
            workers=int(data_cfg.worker_count), batches=repeats, warmup=3)
        clips = len(source)
    step = timing.summarize(times)
    return _record("data", spec, opts, section, batch=batch, repeats=repeats,
                   dataset=str(data_cfg.name), num_train=clips, crop_seconds=crop,
                   sample_rate=int(data_cfg.sample_rate), workers=int(data_cfg.worker_count),
                   build_s=build_s, compile_s=None, step_s=step,
                   # The pipeline reads ahead, so single batches are uneven: the total counts.
                   examples_per_s=batch * len(times) / sum(times),
                   mb_per_s=nbytes / sum(times) / 1e6, flops_per_step=None, flops_per_s=None,
                   **peak_fields(opts), mfu=None, peak_memory_bytes=None,
                   peak_memory_source="not applicable: the pipeline runs on the host")


# ------------------------------------------------------------------------------------ codec

def _rtf_row(metrics: dict, seconds: float) -> dict:
    flops = metrics.get("flops_per_step")
    return {**metrics, "rtf": seconds / metrics["step_s"]["median"],
            "flops_per_audio_second": flops / seconds if flops else None}


def bench_codec(opts: Options) -> dict:
    """Codec G+D train step (clips/s) and encode / decode real-time factor of --seconds."""
    from ldm_jax.codec import train as codec_train
    from ldm_jax.codec.model import Codec, make_codec

    spec, cfg, section = load_stage(opts, "codec", "codec", "encoder_rates")
    peer = load_peer(opts, "codec")
    if peer is not None:
        try:  # DAC's classes describe only some codecs: say so before timing anything
            peer.module.build_models(section)
        except ValueError as e:
            raise ConfigError(f"--peer: {e}") from e
    meter, peak = make_meter(opts)
    n = codec_train.crop_samples(section)
    sr, channels = int(section.model.sample_rate), int(section.model.channels)
    batch = opts.batch or int(section.train.batch_size)
    init = functools.partial(codec_train.init_state, section, crop_samples=n)
    state = meter.call(lambda r: nn.meta.unbox(init(r)), jax.random.key(0))
    params = param_count(state["params"])
    decoder_params = param_count(state["params"]["decoder"])
    rng = np.random.default_rng(0)
    audio = jnp.asarray(0.1 * rng.standard_normal((batch, n, channels)), jnp.float32)
    step = functools.partial(codec_train.train_step, cfg=section)
    state, train = meter(step, state, {"audio": audio}, jax.random.key(1), examples=batch,
                         donate=(0,), threads_state=True)
    compared = {}
    if peer is not None:
        compared = run_peer(peer, opts, train, cfg=section, batch=batch, samples=n,
                            repeats=meter.repeats, dtype=str(section.model.dtype))

    codec = make_codec(section.model)
    variables = {"params": state["params"]}
    if state["stats"]:
        variables["codebook_stats"] = state["stats"]
    seconds = float(opts.seconds or DEFAULT_SECONDS)
    clip = jnp.asarray(0.1 * rng.standard_normal((1, int(seconds * sr), channels)), jnp.float32)
    encode = lambda v, x: codec.apply(v, x, method=Codec.encode)[0]
    decode = lambda v, z: codec.apply(v, z, method=Codec.decode)
    z, enc = meter(encode, variables, clip, examples=1)
    _, dec = meter(decode, variables, z, examples=1)
    return _record("codec", spec, opts, section, params=params, decoder_params=decoder_params,
                   decoder=str(section.model.get("decoder", "conv")), batch=batch,
                   repeats=meter.repeats, crop_seconds=n / sr, sample_rate=sr, **train, **peak,
                   seconds=seconds, encode=_rtf_row(enc, seconds), decode=_rtf_row(dec, seconds),
                   **compared)


# ------------------------------------------------------------------------------------- clap

def clap_params(cfg) -> dict:
    """CLAP parameter counts from `jax.eval_shape` of the init (nothing is allocated)."""
    from ldm_jax.clap.model import init_params

    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    return {"params": param_count(shapes), "text_params": param_count(shapes["text"]),
            "audio_params": param_count(shapes["audio"])}


def bench_clap(opts: Options) -> dict:
    """CLAP train step (InfoNCE, AdamW; pairs/s) and the jitted caption and clip embedders."""
    from ldm_jax.clap import model as clap_model
    from ldm_jax.clap import train as clap_train

    spec, cfg, section = load_stage(opts, "clap", "clap", "text")
    meter, peak = make_meter(opts)
    vocab, length = int(section.model.text.vocab_size), int(section.model.text.max_length)
    sr = int(section.model.audio.sample_rate)
    batch = opts.batch or int(section.train.batch_size)
    # The step consumes token ids; the tokenizer only bounds the vocabulary here.
    task = clap_train.make_task(section, types.SimpleNamespace(vocab_size=vocab))
    state = meter.call(lambda r: nn.meta.unbox(task.init(r)), jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens, text_mask = inputs.random_captions(rng, batch, length, vocab)
    audio, audio_mask = inputs.random_clips(rng, batch, int(float(section.data.crop_seconds) * sr))
    arrays = {"tokens": tokens, "text_mask": text_mask, "audio": audio, "audio_mask": audio_mask}
    state, train = meter(task.step, state, arrays, jax.random.key(1), examples=batch,
                         donate=(0,), threads_state=True)

    eval_batch, eval_seconds = int(section.eval.batch_size), float(section.eval.crop_seconds)
    embed_text, embed_audio = clap_model.make_embedders(section)
    tokens, text_mask = inputs.random_captions(rng, eval_batch, length, vocab)
    audio, audio_mask = inputs.random_clips(rng, eval_batch, int(eval_seconds * sr))
    _, text = meter(embed_text, state["params"], tokens, text_mask, examples=eval_batch)
    _, clips = meter(embed_audio, state["params"], audio, audio_mask, examples=eval_batch)
    return _record("clap", spec, opts, section, **clap_params(section), batch=batch,
                   repeats=meter.repeats, crop_seconds=float(section.data.crop_seconds),
                   text_length=length, **train, **peak, eval_batch=eval_batch,
                   eval_crop_seconds=eval_seconds, embed_text=text, embed_audio=clips)


# ---------------------------------------------------------------------------- latent diffusion

def ldm_setup(opts: Options, target: str) -> types.SimpleNamespace:
    """The LDM stage of the preset, its codec and the latent frame rate.

    The codec is `inputs.paired_codec`'s; the frame rate is --frame-rate, else the codec's.

    Returns:
      Namespace of spec, section (the LDM config), codec (a `CodecConfig` or None),
      codec_source, frame_rate, frame_rate_source.
    """
    spec, cfg, section = load_stage(opts, target, "ldm", "latent_channels")
    codec, codec_spec = inputs.paired_codec(spec, cfg, opts.codec)
    if codec is not None and codec.resolved_latent_dim != int(section.model.latent_channels):
        raise ConfigError(f"codec {codec_spec} has latent_dim {codec.resolved_latent_dim} but "
                          f"the U-Net takes model.latent_channels={section.model.latent_channels}"
                          "; pair another --codec")
    if opts.frame_rate:
        rate, rate_source = float(opts.frame_rate), "--frame-rate"
    elif codec is not None:
        rate = codec.frame_rate
        rate_source = f"codec {codec_spec}: {codec.sample_rate} Hz / hop {codec.hop_length}"
    else:
        raise ConfigError(f"no codec pairs with preset {spec!r}: give --codec CODEC_PRESET or "
                          "--frame-rate FRAMES_PER_S")
    return types.SimpleNamespace(spec=spec, section=section, codec=codec, codec_source=codec_spec,
                                 frame_rate=rate, frame_rate_source=rate_source)


def bench_unet(opts: Options) -> dict:
    """The LDM train step (`diffusion.train.train_step`) on random latents of
    `data.crop_seconds` x frame rate frames and random text conditions; latent clips/s."""
    from ldm_jax.diffusion import train as ldm_train

    ldm = ldm_setup(opts, "unet")
    section = ldm.section
    peer = load_peer(opts, "unet")
    meter, peak = make_meter(opts)
    crop = float(section.data.crop_seconds)
    frames = int(round(crop * ldm.frame_rate))  # the latents pipeline's crop length
    if peer is not None:
        _check_unet_peer(section.model, frames)
    batch = opts.batch or int(section.train.batch_size)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((batch, frames, int(section.model.latent_channels)))
    arrays = {"latents": latents.astype(np.float32),
              "latents_mask": np.ones((batch, frames), bool),
              **inputs.random_condition(section, batch, rng)}
    init = functools.partial(ldm_train.init_state, section)
    state = meter.call(lambda r: nn.meta.unbox(init(r)), jax.random.key(0))
    abstract = inputs.abstract((state, arrays))
    step = functools.partial(ldm_train.train_step, cfg=section)
    _, train = meter(step, state, arrays, jax.random.key(1), examples=batch, donate=(0,),
                     threads_state=True)
    extra = {}
    if peer is not None:
        extra = run_peer(peer, opts, train, model_cfg=section.model, batch=batch, frames=frames,
                         context_len=int(arrays["context"].shape[1]), repeats=meter.repeats,
                         dtype=str(section.model.dtype))
    if section.model.remat:
        # XLA counts the recomputed forward passes; the step without them is the model's work.
        plain = section.copy_and_resolve_references()
        plain.model.remat = False
        lowered = jax.jit(functools.partial(ldm_train.train_step, cfg=plain)).lower(
            *abstract, jax.random.key(1))
        flops = hardware.cost_flops(lowered.cost_analysis())
        extra.update(flops_per_step_without_remat=flops,
                     mfu_without_remat=hardware.mfu(flops, train["step_s"]["median"],
                                                    meter.peak_flops))
    return _record("unet", ldm.spec, opts, section, params=param_count(abstract[0]["params"]),
                   batch=batch, repeats=meter.repeats, crop_seconds=crop, frames=frames,
                   frame_rate=ldm.frame_rate, frame_rate_source=ldm.frame_rate_source,
                   context_length=int(arrays["context"].shape[1]), **train, **peak, **extra)


def _check_unet_peer(model_cfg, frames: int):
    """One-line errors for U-Nets the PyTorch peer does not build (it has no patching and needs
    whole strides)."""
    if int(model_cfg.get("patch_size", 1)) != 1:
        raise ConfigError("--peer: the PyTorch U-Net has no patch_size; drop --peer or "
                          "model.patch_size")
    multiple = 2 ** (len(model_cfg.channel_mult) - 1)
    if frames % multiple:
        raise ConfigError(f"--peer: the PyTorch U-Net needs frames in multiples of {multiple}, "
                          f"got {frames}; change data.crop_seconds")


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def bench_sample(opts: Options) -> dict:
    """Sampling real-time factor: `steps` of the sampler with classifier-free guidance (one
    doubled batch) and the codec decode, for --seconds of audio at batch 1, 2, 4, ... up to
    --max-batch or the first out-of-memory error, with a randomly initialised U-Net and codec."""
    from ldm_jax.codec.model import Codec, make_codec
    from ldm_jax.diffusion import conditioning, samplers
    from ldm_jax.diffusion import config as ldm_config
    from ldm_jax.diffusion.unet import example_inputs, make_unet

    if opts.batch is not None:
        raise ConfigError("bench sample measures batch 1 and doubles it: give --max-batch, not "
                          "--batch")
    ldm = ldm_setup(opts, "sample")
    section, codec_cfg = ldm.section, ldm.codec
    if codec_cfg is None:
        raise ConfigError("bench sample decodes with a codec: give --codec CODEC_PRESET")
    if opts.dtype is not None:
        codec_cfg = dataclasses.replace(codec_cfg, dtype=opts.dtype)
    meter, peak = make_meter(opts, 3, 10)
    max_batch = opts.max_batch or (64 if on_accelerator() else 4)
    # `Generator.frames_for`: one frame more than whole frames cover.
    seconds = float(opts.seconds or DEFAULT_SECONDS)
    frames = int(np.floor(seconds * ldm.frame_rate + 1e-6)) + 1
    unet = make_unet(section.model)
    params = meter.call(lambda r: nn.meta.unbox(unet.init(r, **example_inputs(unet)))["params"],
                        jax.random.key(0))
    codec = make_codec(codec_cfg)
    hop = jnp.zeros((1, codec_cfg.hop_length, codec_cfg.channels), jnp.float32)
    variables = meter.call(lambda r: nn.meta.unbox(codec.init({"params": r}, hop)),
                           jax.random.key(1))
    objective = ldm_config.diffusion_config(section).objective
    schedule = ldm_config.schedule_from_config(section)
    gen = dict(section.get("generation", {}) or {})
    scale = jnp.float32(gen.get("cfg_scale", 3.0))

    def model_fn(p, x, t, c):
        return unet.apply({"params": p}, x, t, c["context"], c["context_mask"], c["pooled"])[0]

    def generate(p, noise, cond, uncond, scale, rng):
        fn = samplers.cfg_batched_model_fn(functools.partial(model_fn, p), cond, uncond, scale)
        return samplers.sample(opts.sampler, fn, noise, schedule, opts.steps, objective, rng=rng)

    decode = lambda v, z: codec.apply(v, z, method=Codec.decode)
    rng = np.random.default_rng(0)
    # XLA counts a scan's body once, so the sampler's FLOPs are the guided call's times steps.
    pair = inputs.random_condition(section, 2, rng)
    call_flops = hardware.cost_flops(jax.jit(model_fn).lower(
        params, jax.ShapeDtypeStruct((2, frames, unet.latent_channels), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.int32), inputs.abstract(pair)).cost_analysis())

    def row(b: int) -> dict:
        cond = inputs.random_condition(section, b, rng)
        noise = rng.standard_normal((b, frames, unet.latent_channels)).astype(np.float32)
        args = jax.device_put((params, noise, cond, conditioning.null_condition(cond), scale,
                               jax.random.key(2)))
        sampler, _, sampler_compile = meter.compile(generate, *args)
        latents, sampler_times = timing.time_calls(sampler, *args, repeats=meter.repeats)
        decoder, _, decode_compile = meter.compile(decode, variables, latents)
        _, decode_times = timing.time_calls(decoder, variables, latents, repeats=meter.repeats)
        # Both programs are warm by now.
        _, total_times = timing.time_calls(lambda: decoder(variables, sampler(*args)),
                                           repeats=meter.repeats, warmup=0)
        total = timing.summarize(total_times)
        decode_flops = hardware.cost_flops(decoder.cost_analysis())
        flops = opts.steps * call_flops * b + (decode_flops or 0.0) if call_flops else None
        memory, source = max(hardware.peak_memory(sampler), hardware.peak_memory(decoder),
                             key=lambda m: m[0] or 0)
        audio = b * seconds
        return {"batch": b, "compile_s": {"sampler": sampler_compile, "decode": decode_compile},
                "sampler_s": timing.summarize(sampler_times),
                "decode_s": timing.summarize(decode_times), "total_s": total,
                "rtf": audio / total["median"],
                "rtf_sampler": audio / timing.summarize(sampler_times)["median"],
                "rtf_decode": audio / timing.summarize(decode_times)["median"],
                "clips_per_s": b / total["median"], "flops_per_generation": flops,
                "flops_per_s": flops / total["median"] if flops else None,
                "mfu": hardware.mfu(flops, total["median"], meter.peak_flops),
                "peak_memory_bytes": memory, "peak_memory_source": source}

    rows, oom_at, b = [], None, 1
    while b <= max_batch:
        try:
            rows.append(row(b))
        except Exception as e:  # noqa: BLE001 — an allocation failure ends the batch search
            if not _is_oom(e):
                raise
            if not rows:
                raise ConfigError(f"sampling {seconds} s does not fit in device memory at "
                                  "batch 1; lower --seconds") from e
            oom_at = b
            break
        b *= 2
    first, last = rows[0], rows[-1]
    return _record(
        "sample", ldm.spec, opts, section, params=param_count(params),
        codec=ldm.codec_source, codec_params=param_count(variables["params"]),
        codec_dtype=codec_cfg.dtype, frame_rate=ldm.frame_rate,
        frame_rate_source=ldm.frame_rate_source, seconds=seconds, frames=frames,
        steps=int(opts.steps), sampler=opts.sampler, cfg_scale=float(scale),
        guidance="classifier-free, one U-Net call on the doubled batch per step",
        batch=1, repeats=meter.repeats,
        compile_s=first["compile_s"]["sampler"] + first["compile_s"]["decode"],
        step_s=first["total_s"], examples_per_s=first["clips_per_s"],
        flops_per_step=first["flops_per_generation"], flops_per_s=first["flops_per_s"], **peak,
        mfu=first["mfu"], peak_memory_bytes=first["peak_memory_bytes"],
        peak_memory_source=first["peak_memory_source"], rtf=first["rtf"],
        largest_batch=last["batch"], rtf_largest_batch=last["rtf"], max_batch=max_batch,
        oom_at_batch=oom_at, unet_call_flops_per_pair=call_flops, rows=rows)


# ------------------------------------------------------------------------------ the dispatcher

def run(target: str, opts: Options) -> dict:
    """Runs one target (`TARGETS`) and returns its JSON-ready record."""
    fns = {"data": bench_data, "codec": bench_codec, "clap": bench_clap, "unet": bench_unet,
           "sample": bench_sample}
    if target not in fns:
        raise ConfigError(f"unknown benchmark {target!r}; use one of {', '.join(TARGETS)}, all")
    if opts.peer and target not in PEERS:
        raise ConfigError(f"--peer: {target} has no PyTorch peer; use it with "
                          f"{' or '.join(PEERS)}")
    return fns[target](opts)


def run_all(opts: Options) -> dict:
    """Every target on its CPU-sized preset (`CPU_PRESETS`), with the shared options (sampling
    `ALL_SAMPLE_SECONDS` of audio unless --seconds is given)."""
    if opts.preset or opts.overrides:
        raise ConfigError("bench all runs each target on its own preset: drop --preset and "
                          "--config overrides, or bench one target")
    results = []
    for target in TARGETS:
        sub = dataclasses.replace(
            opts, preset=CPU_PRESETS[target],
            batch=None if target == "sample" else opts.batch,
            seconds=opts.seconds or (ALL_SAMPLE_SECONDS if target == "sample" else None),
            remat=opts.remat if target in ("clap", "unet", "sample") else None,
            peer=opts.peer and target in PEERS)
        results.append(run(target, sub))
    return {"target": "all", **hardware.environment(), "results": results}


def write_json(result: dict, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")


def emit(result: dict, path: str | None):
    """Prints a record as JSON and, with a path, also writes it there (the scripts' output)."""
    print(json.dumps(result, indent=2, default=str))
    if path:
        write_json(result, path)


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def summary(result: dict) -> list[str]:
    """A few human-readable lines of a record of `run` or `run_all`."""
    if result["target"] == "all":
        return [line for r in result["results"] for line in summary(r)]
    r, step = result, result["step_s"]
    unit = {"data": "batch", "sample": "generation"}.get(r["target"], "step")
    parts = [f"{r['target']} {r['preset']}: batch {r['batch']}",
             f"{_duration(step['median'])}/{unit} (min {_duration(step['min'])}, "
             f"max {_duration(step['max'])})", f"{r['examples_per_s']:.3g} examples/s"]
    if r.get("compile_s") is not None:
        parts.append(f"compile {r['compile_s']:.1f} s")
    if r.get("flops_per_s"):
        parts.append(f"{r['flops_per_s'] / 1e9:.3g} GFLOP/s")
    parts.append(f"MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "MFU n/a")
    if r.get("peak_memory_bytes"):
        parts.append(f"peak memory {r['peak_memory_bytes'] / 2 ** 20:.0f} MiB")
    lines = [", ".join(parts)]
    if r["target"] == "data":
        lines.append(f"  {r['mb_per_s']:.1f} MB/s of float32 audio, {r['crop_seconds']} s crops")
    elif r["target"] == "codec":
        lines.append(f"  {r['seconds']} s clip: encode {r['encode']['rtf']:.1f}x real time, "
                     f"decode {r['decode']['rtf']:.1f}x")
    elif r["target"] == "clap":
        lines.append(f"  embed: {r['embed_text']['examples_per_s']:.0f} captions/s, "
                     f"{r['embed_audio']['examples_per_s']:.0f} clips/s "
                     f"(batch {r['eval_batch']})")
    if r.get("peer"):
        p = r["peer"]
        lines.append(f"  PyTorch peer ({p['device']}, {p['threads']} threads): "
                     f"{_duration(p['step_s'])}/step, {p['examples_per_s']:.3g} examples/s; "
                     f"ours/peer {r['speed_ratio_vs_peer']:.2f}x")
    if r["target"] == "sample":
        for row in r["rows"]:
            lines.append(f"  batch {row['batch']}: {row['rtf']:.3g}x real time (sampler "
                         f"{row['rtf_sampler']:.3g}x, decode {row['rtf_decode']:.3g}x), "
                         f"{row['clips_per_s']:.3g} clips/s of {r['seconds']} s")
        if r.get("oom_at_batch"):
            lines.append(f"  batch {r['oom_at_batch']}: out of memory")
    return lines
