"""The `ldm-jax` command.

Every command takes `--config FILE[:arg]` (default: the embedded `tiny` experiment) and any number
of `--config.a.b=value` overrides. Mistakes a user can make end in one line on stderr, exit code 2.

Every command runs on several hosts as on one (each host runs the same command line; TPU pods and
SLURM are detected, `--coordinator` or LDM_JAX_COORDINATOR elsewhere). Training, the chain and
the commands that evaluate, encode or generate run on every host and share their batches;
commands that write one file or one dataset from host code (`data build`, `tokenizer train`,
`codec encode`, ...) run on process 0 while the others wait (`parallel.on_leader`). Process 0
writes every output and prints the results.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from ldm_jax import config as config_lib
from ldm_jax import paths

EPILOG = ("Config: --config FILE[:ARG] selects an experiment (a path or an embedded name such as "
          "`tiny`); --config.SECTION.KEY=VALUE overrides one field.")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `ldm-jax generate: error: argument --seconds: ...`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(kind, ok, what: str):
    """An argparse `type` that parses KIND and refuses values failing OK, naming WHAT it wants
    (argparse adds the option's name)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = what  # what argparse calls the type in its own messages
    return parse


POSITIVE_INT = _checked(int, lambda v: v >= 1, "a positive integer")
COUNT = _checked(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE = _checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
NON_NEGATIVE = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
FINITE = _checked(float, math.isfinite, "a finite number")
FRACTION = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _add_config(p: argparse.ArgumentParser, workdir: bool = True, data_dir: bool = False,
                default: str | None = None):
    p.add_argument("--config", default=default, metavar="FILE[:ARG]",
                   help=f"experiment config file or embedded name (default: {default or 'tiny'})")
    if workdir:
        p.add_argument("--workdir", default=None, help="experiment directory (W)")
    if data_dir:
        p.add_argument("--data-dir", default=None,
                       help="TFDS data directory (default: the config's data.data_dir or W/data)")


def _add_control_files(g, *, rhythm: bool, verb: str):
    """The options that give controls from files: --melody-from, --dynamics-from (and
    --rhythm-from), --melody-midi, --dynamics-curve, --control-start, --control-end."""
    names = [("melody", "its melody"), ("dynamics", "its dynamics (level curve)")]
    for name, what in names + ([("rhythm", "its beats and downbeats")] if rhythm else []):
        g.add_argument(f"--{name}-from", default=None, metavar="REF",
                       help=f"follow {what}: an audio file"
                            + (" or a MIDI file" if name != "dynamics" else
                               ", a MIDI file or a CSV of time,db rows"))
    g.add_argument("--melody-midi", default=None, metavar="FILE.mid",
                   help="the melody of a MIDI file (as --melody-from FILE.mid)")
    g.add_argument("--dynamics-curve", default=None, metavar="FILE.csv",
                   help="a level curve of time,db rows (as --dynamics-from FILE.csv)")
    g.add_argument("--control-start", type=NON_NEGATIVE, default=None, metavar="S",
                   help=f"{verb} from S seconds on (default 0)")
    g.add_argument("--control-end", type=POSITIVE, default=None, metavar="S",
                   help=f"{verb} up to S seconds (default: the clip's end)")


def _add_distributed(p: argparse.ArgumentParser):
    g = p.add_argument_group("multi-host (TPU pods and SLURM are detected automatically)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="coordinator address of process 0 (env LDM_JAX_COORDINATOR)")
    g.add_argument("--num-processes", type=POSITIVE_INT, default=None,
                   help="number of processes (env LDM_JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=COUNT, default=None,
                   help="this process's index (env LDM_JAX_PROCESS_ID)")


def _data_dir(args, cfg) -> str:
    path = getattr(args, "data_dir", None) or cfg.data.data_dir or (
        os.path.join(args.workdir, "data") if getattr(args, "workdir", None) else "")
    if not path:
        raise config_lib.ConfigError("say where the data is: --data-dir D or --workdir W")
    return paths.resolve(path)


# ---------------------------------------------------------------------------------------- data

def cmd_data_build(args, cfg):
    from ldm_jax.data import builders
    with cfg.unlocked():
        cfg.data.name = args.name
        if args.source:
            cfg.data.source = paths.resolve(args.source)
    if args.name == "audio_folder" and not cfg.data.source:
        raise config_lib.ConfigError("audio_folder needs --source FOLDER (or --config.data.source)")
    summary = builders.build(args.name, cfg.data, _data_dir(args, cfg), overwrite=args.overwrite)
    print(builders.format_summary(summary))


def cmd_data_show(args, cfg):
    from ldm_jax.data import builders
    from ldm_jax.eval import plots
    data_dir = _data_dir(args, cfg)
    examples = builders.show(data_dir, args.name, args.split, args.num)
    for ex in examples:
        audio = ex.get("audio")
        attrs = {k: v for k, v in ex.items() if k not in ("audio", "caption")}
        seconds = (len(audio) / cfg.data.sample_rate) if audio is not None else 0.0
        print(f"[{ex.get('id', '?')}] {ex.get('caption', '') or '(no caption)'}")
        attrs.setdefault("seconds", round(seconds, 2))
        print("    " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(attrs.items()) if k != "id"))
    png = args.png or os.path.join(data_dir, f"{args.name}_{args.split}.png")
    plots.save_log_mel_grid(png, [ex["audio"] for ex in examples],
                            [ex.get("caption", "") for ex in examples], cfg.data.sample_rate)
    print(f"log-mel spectrograms: {png}")


def _is_leader() -> bool:
    from ldm_jax import parallel
    return parallel.is_leader()


def _print_json(result: dict, path: str | None, **seeds):
    """Prints metrics as JSON and also writes them to PATH when given, with their provenance
    (commit, versions, devices, SEEDS); process 0."""
    import json

    from ldm_jax import provenance
    if not _is_leader():
        return
    print(json.dumps(result, indent=2))
    if path:
        record = {**result, "provenance": provenance.record(**seeds)}
        paths.write_text(path, json.dumps(record, indent=2) + "\n")


def _fmt(v):
    import numpy as np
    return f"{float(v):.1f}" if isinstance(v, (float, np.floating)) else str(v)


# ----------------------------------------------------------------------------------- tokenizer

def cmd_tokenizer_train(args, cfg):
    from ldm_jax import chain
    from ldm_jax import workdir as workdir_lib
    out = args.out or cfg.tokenizer.path or (
        os.path.join(args.workdir, "tokenizer", "spm.model") if args.workdir else "")
    if not out:
        raise config_lib.ConfigError("say where to write the tokenizer: --out PATH or --workdir W")
    where = workdir_lib.Layout(root=paths.resolve(args.workdir or "."),
                               data_dir=_data_dir(args, cfg), tokenizer=out)
    t = chain.train_tokenizer(cfg, where)
    print(f"tokenizer: {out} ({t['vocab_size']} pieces, {t['captions']} captions)")
    print(f"  {t['example']!r} -> {t['example_tokens']}")
    print(f"  caption tokens: median {t['median']}, longest {t['longest']}; "
          f"max_length {t['max_length']}")
    if t["cut"]:
        print(f"warning: {t['cut']} of {t['captions']} captions are longer than max_length="
              f"{t['max_length']} tokens and lose their ends; raise "
              f"--config.tokenizer.max_length to {t['longest']} to keep them whole",
              file=sys.stderr)


# --------------------------------------------------------------------------------------- codec

def stage_config(cfg, stage: str):
    """A stage's own config: `cfg.<stage>` of a chain experiment (one that lists its `stages`),
    else the config itself, which must then be that stage's experiment."""
    from ldm_jax import chain
    if chain.is_chain(cfg):
        if stage not in cfg:
            raise config_lib.ConfigError(f"the chain experiment {cfg.get('config_file', '')} has "
                                         f"no {stage} section")
        return cfg[stage]
    if "model" not in cfg:
        raise config_lib.ConfigError(f"config {cfg.get('config_file', '')} is neither a chain "
                                     f"experiment (it lists no stages) nor a {stage} "
                                     f"experiment (it has no model): use one such as "
                                     f"{stage}_tiny")
    return cfg


def _require_workdir(args) -> str:
    if not args.workdir:
        raise config_lib.ConfigError("say where the experiment lives: --workdir W")
    return paths.resolve(args.workdir)


def _layout(args, cfg):
    """The command's workdir layout: --workdir W, with --data-dir, --tokenizer, --latents and
    --clap where the command has them."""
    from ldm_jax import workdir as workdir_lib
    return workdir_lib.layout(cfg, _require_workdir(args), data_dir=getattr(args, "data_dir", None),
                              tokenizer=getattr(args, "tokenizer", None),
                              latents=getattr(args, "latents", None),
                              clap=getattr(args, "clap", None))


def cmd_train(args, cfg):
    """`ldm-jax train STAGE`: the chain's stage runner on this stage's config."""
    from ldm_jax import chain
    name = args.train_command
    stage = stage_config(cfg, name)
    where = _layout(args, stage)
    if name == "clap" and not paths.isfile(where.tokenizer):
        raise config_lib.ConfigError(f"no tokenizer at {where.tokenizer}: run `ldm-jax tokenizer "
                                     f"train --workdir {where.root}` first or pass --tokenizer")
    result = chain.train_stage(name, stage, where)
    state = "stopped by a signal at" if result.preempted else "finished at"
    if _is_leader():
        print(f"{name}: {state} step {result.step}; checkpoints in "
              f"{where.stage(name)}/checkpoints")


def _codec_source(args) -> str:
    source = args.codec or args.workdir
    if not source:
        raise config_lib.ConfigError("say which codec: --workdir W (trained) or --codec DIR")
    return source


def cmd_codec_encode(args, cfg):
    import numpy as np

    from ldm_jax.audio import io as audio_io
    from ldm_jax.codec import inference
    loaded = inference.load_trained(_codec_source(args))
    audio, _ = audio_io.read_audio(args.input, sample_rate=loaded.sample_rate,
                                   mono=loaded.config.channels == 1)
    n_codebooks = args.n_codebooks
    if args.bandwidth is not None:
        if n_codebooks is not None:
            raise config_lib.ConfigError("give --bandwidth or --n-codebooks, not both")
        n_codebooks = loaded.config.n_codebooks_for_bandwidth(args.bandwidth)
    # A codec trained on segments (EnCodec 48 kHz) encodes each on its own, as EnCodec does.
    encode = loaded.encode_segments if loaded.segment else loaded.encode
    out = encode(audio[None], n_codebooks)
    payload = {"z": out["z"][0], "sample_rate": loaded.sample_rate, "num_samples": len(audio),
               "hop_length": loaded.config.hop_length}
    if "codes" in out:
        payload["codes"] = out["codes"][0].astype(np.int32)
    if "scale" in out:
        payload["scale"] = out["scale"][0]
    if "segment_frames" in out:
        payload["segment_frames"] = out["segment_frames"]
    np.savez_compressed(args.output, **payload)
    what = (f"codes {payload['codes'].shape}" if "codes" in payload
            else f"latents {out['z'][0].shape}")
    print(f"{args.output}: {what} for {len(audio) / loaded.sample_rate:.2f} s")


def cmd_codec_decode(args, cfg):
    import numpy as np

    from ldm_jax.audio import io as audio_io
    from ldm_jax.codec import inference
    loaded = inference.load_trained(_codec_source(args))
    try:
        data = np.load(args.input)
    except (OSError, ValueError) as e:
        raise config_lib.ConfigError(f"cannot read {args.input}: {e}") from e
    scale = data["scale"][None] if "scale" in data else None
    if "codes" in data:
        codes = data["codes"]
        k = args.n_codebooks or codes.shape[-1]
        if k > codes.shape[-1]:
            raise config_lib.ConfigError(f"{args.input} holds {codes.shape[-1]} codebooks; "
                                         f"--n-codebooks {k} is too many")
        if "segment_frames" in data:
            audio = loaded.decode_segments(data["segment_frames"], codes=codes[None, :, :k],
                                           scale=scale)[0]
        else:
            audio = loaded.decode_codes(codes[None, :, :k], scale)[0]
    elif "segment_frames" in data:
        audio = loaded.decode_segments(data["segment_frames"], z=data["z"][None], scale=scale)[0]
    else:
        audio = loaded.decode(data["z"][None], scale)[0]
    n = int(data["num_samples"]) if "num_samples" in data else len(audio)
    audio_io.write_audio(args.output, audio[:n], loaded.sample_rate)
    print(f"{args.output}: {min(n, len(audio)) / loaded.sample_rate:.2f} s")


def cmd_codec_eval(args, cfg):

    from ldm_jax.codec import inference
    from ldm_jax.data import builders
    loaded = inference.load_trained(_codec_source(args))
    stage = stage_config(cfg, "codec")
    source = builders.open_split(_data_dir(args, stage), stage.data.name, args.split)
    clips = builders.Column(source, "audio", None if args.max_clips <= 0 else args.max_clips)
    result = inference.evaluate(loaded, clips, n_codebooks=args.n_codebooks)
    _print_json(result, args.json, codec_seed=stage.get("seed"))


def cmd_codec_import_dac(args, cfg):
    from ldm_jax.codec import convert, inference
    from ldm_jax.codec.model import CodecConfig
    config, params = convert.import_dac(args.weights)
    config = config if isinstance(config, CodecConfig) else CodecConfig.from_dict(config)
    inference.write_checkpoint(args.out, config, params)
    print(f"{args.out}: DAC codec at {config.sample_rate} Hz, {config.n_codebooks} codebooks, "
          f"hop {config.hop_length}")


def cmd_codec_import_encodec(args, cfg):
    from ldm_jax.codec import encodec_import, inference
    from ldm_jax.codec.model import CodecConfig
    if args.overrides:
        raise config_lib.ConfigError("codec import-encodec takes no --config.KEY overrides: its "
                                     "--config is EnCodec's constructor arguments (JSON)")
    config, params, stats = encodec_import.import_encodec(args.weights, args.config)
    config = CodecConfig.from_dict(config)
    inference.write_checkpoint(args.out, config, params, stats)
    bandwidths = ", ".join(f"{b:g}" for b in config.target_bandwidths)
    print(f"{args.out}: EnCodec codec at {config.sample_rate} Hz, {config.channels} channel(s), "
          f"{config.n_codebooks} codebooks, hop {config.hop_length}"
          + (f", bandwidths {bandwidths} kbps" if bandwidths else ""))


# ---------------------------------------------------------------------------------------- clap

def _clap_dir(args) -> str:
    workdir = _require_workdir(args)
    return os.path.join(workdir, "clap") if paths.isdir(os.path.join(workdir, "clap")) \
        else workdir


def cmd_clap_eval(args, cfg):

    from ldm_jax.clap import evaluate as clap_eval
    stage = stage_config(cfg, "clap")
    result = clap_eval.evaluate(None, _clap_dir(args), _data_dir(args, stage), split=args.split)
    _print_json(result, args.json, clap_seed=stage.get("seed"))


def cmd_clap_retrieve(args, cfg):
    from ldm_jax.clap import evaluate as clap_eval
    stage = stage_config(cfg, "clap")
    ranked = clap_eval.retrieve(_clap_dir(args), _data_dir(args, stage), args.query,
                                top=args.top, split=args.split)
    if not _is_leader():
        return
    print(f"query: {args.query!r}")
    for rank, (ident, caption, score) in enumerate(ranked, 1):
        print(f"{rank:2d}. {score:+.3f}  [{ident}] {caption}")


# ---------------------------------------------------------------------------- latent diffusion

def cmd_latents_encode(args, cfg):
    from ldm_jax.codec import latents as codec_latents
    stage = stage_config(cfg, "codec")
    out = args.out or (os.path.join(args.workdir, "latents") if args.workdir else "")
    if not out:
        raise config_lib.ConfigError("say where to write the latents: --out DIR or --workdir W")
    summary = codec_latents.encode_latents(args.codec or _require_workdir(args), stage.data,
                                     _data_dir(args, stage), paths.resolve(out),
                                     overwrite=args.overwrite)
    if _is_leader():
        print(f"latents: {summary.get('path', out)} {summary.get('splits', {})}, "
              f"{summary.get('latent_dim')} channels at {summary.get('frame_rate')} frames/s, "
              f"scale factor {summary.get('scale_factor', float('nan')):.4g}")


def cmd_generate(args, cfg):
    from ldm_jax.audio import io as audio_io
    from ldm_jax.diffusion import generate
    from ldm_jax.diffusion.config import generation_config
    workdir = _require_workdir(args)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise config_lib.ConfigError("give a prompt or --prompts-file FILE")
    init = inpaint = None
    gen = generate.get_generator(workdir)
    if args.init_audio:
        init, _ = audio_io.read_audio(args.init_audio, sample_rate=gen.sample_rate)
    if args.inpaint_audio:
        inpaint, _ = audio_io.read_audio(args.inpaint_audio, sample_rate=gen.sample_rate)
    # Options not given on the command line: the trained run's own `generation` section.
    g = generation_config(gen.cfg)
    sampler = "dpmpp_2m" if args.sampler == "dpmpp" else (args.sampler or g.sampler)
    seed = g.seed if args.seed is None else args.seed
    controls, ranges = _controls_args(args, gen)
    audio = gen.generate_shared(
        prompts, seconds=args.seconds, controls=controls, control_ranges=ranges,
        control_scale=args.control_scale, steps=args.steps or g.steps, sampler=sampler,
        cfg_scale=g.cfg_scale if args.cfg is None else args.cfg,
        negative_prompt=args.negative_prompt or g.negative_prompt or None,
        seed=[seed + i for i in range(len(prompts))],
        init_audio=None if init is None else [init[:, 0]] * len(prompts), strength=args.strength,
        inpaint_audio=None if inpaint is None else [inpaint[:, 0]] * len(prompts),
        inpaint_start=args.inpaint_start, inpaint_end=args.inpaint_end,
        long_form=args.long_form, window_seconds=args.window_seconds,
        overlap_seconds=args.overlap_seconds, progress=True)
    if not _is_leader():
        return
    seconds = args.seconds or (audio.shape[1] / gen.sample_rate)
    plan = gen.long_form_plan(seconds, args.long_form or "window", args.window_seconds,
                              args.overlap_seconds) \
        if args.long_form != "none" and not (init is not None or inpaint is not None or
                                             controls) else None
    if plan is not None:
        print(f"long-form ({plan['method']}): {plan['windows']} windows of "
              f"{(plan['window_frames'] - 1) / gen.stats.frame_rate:g} s overlapping by "
              f"{plan['overlap_frames'] / gen.stats.frame_rate:g} s")
    outs = [args.output] if len(prompts) == 1 else [
        f"{os.path.splitext(args.output)[0]}_{i:03d}.wav" for i in range(len(prompts))]
    for path, clip, prompt in zip(outs, audio, prompts):
        audio_io.write_audio(path, clip, gen.sample_rate)
        print(f"{path}: {prompt!r} ({len(clip) / gen.sample_rate:.2f} s)")


def _controls_args(args, gen):
    """The controls `ldm-jax generate` was given: ({name: controls} or None, their ranges)."""
    from ldm_jax import controls as controls_lib
    files = {"melody": args.melody_from or args.melody_midi,
             "dynamics": args.dynamics_from or args.dynamics_curve,
             "rhythm": getattr(args, "rhythm_from", None)}
    for name, a, b, other in (("melody", args.melody_from, args.melody_midi, "melody-midi"),
                              ("dynamics", args.dynamics_from, args.dynamics_curve,
                               "dynamics-curve")):
        if a and b:
            raise config_lib.ConfigError(f"give the {name} once: --{name}-from or --{other}")
    files = {k: v for k, v in files.items() if v}
    if not files:
        if args.control_start is not None or args.control_end is not None or \
                getattr(args, "control_scale", 1.0) != 1.0:
            raise config_lib.ConfigError("--control-start/--control-end/--control-scale need a "
                                         "control (--melody-from, --dynamics-from, ...)")
        return None, None
    rate = gen.stats.frame_rate
    out = {}
    for name, path in files.items():
        if not paths.exists(path):
            raise config_lib.ConfigError(f"--{name}: {path}: no such file")
        try:
            found = controls_lib.controls_from_file(path, frame_rate=rate,
                                                    sample_rate=gen.sample_rate)
        except (OSError, RuntimeError) as e:
            raise config_lib.ConfigError(f"--{name}: cannot read {path}: "
                                         f"{str(e).splitlines()[0]}") from None
        if name not in found:
            raise config_lib.ConfigError(f"--{name}: {path} gives no {name} (a CSV gives only "
                                         "dynamics)")
        out[name] = found
    start = args.control_start or 0.0
    ranges = None
    if args.control_start is not None or args.control_end is not None:
        ranges = {name: (start, args.control_end) for name in out}
    return out, ranges


def _ditto_config(args, cfg):
    """The DITTO options: the command line's, else the experiment's `ditto.optimise`, else
    `DittoConfig`'s defaults."""
    from ldm_jax.diffusion.ditto import DittoConfig
    section = dict((cfg.get("ditto", None) or {}).get("optimise", None) or {})
    for key, value in (("iterations", args.iterations), ("lr", args.lr),
                       ("sampler", args.sampler), ("sampler_steps", args.sampler_steps),
                       ("cfg_scale", args.cfg), ("tolerance", args.tolerance),
                       ("resample_steps", args.resample_steps)):
        if value is not None:
            section[key] = value
    return DittoConfig.from_dict(section, section="ditto.optimise")


def _weights(items) -> dict:
    out = {}
    for item in items or ():
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if name not in ("dynamics", "melody", "structure", "loop", "outpaint", "inpaint") or \
                not (math.isfinite(weight) and weight > 0):
            raise config_lib.ConfigError(f"--weight {item!r}: give TASK=W with TASK one of "
                                         "dynamics, melody, structure, loop, outpaint, inpaint "
                                         "and W a positive number")
        out[name] = weight
    return out


def cmd_ditto(args, cfg):
    import json

    import numpy as np

    from ldm_jax.audio import io as audio_io
    from ldm_jax.diffusion import ditto, generate
    workdir = _require_workdir(args)
    prompts = list(args.prompt or [])
    if not prompts:
        raise config_lib.ConfigError("give a prompt")
    config = _ditto_config(args, cfg)
    weights = _weights(args.weight)
    gen = generate.get_generator(workdir)
    controls, ranges = _controls_args(args, gen)
    clips = {}
    for name in ("outpaint", "inpaint"):
        path = getattr(args, name)
        if path:
            if not paths.exists(path):
                raise config_lib.ConfigError(f"--{name}: {path}: no such file")
            clips[name] = audio_io.read_audio(path, sample_rate=gen.sample_rate)[0][:, 0]
    if (args.inpaint_start is not None or args.inpaint_end is not None) and "inpaint" not in clips:
        raise config_lib.ConfigError("--inpaint-start/--inpaint-end need --inpaint IN.wav")
    seconds = args.seconds
    if seconds is None and "inpaint" in clips:
        seconds = len(clips["inpaint"]) / gen.sample_rate
    result = ditto.ditto(
        prompts, workdir=workdir, seconds=seconds, controls=controls, control_ranges=ranges,
        structure_pattern=args.structure,
        loop_seconds=args.loop_seconds if args.loop else None,
        outpaint_audio=clips.get("outpaint"), outpaint_seconds=args.outpaint_seconds,
        inpaint_audio=clips.get("inpaint"), inpaint_start=args.inpaint_start,
        inpaint_end=args.inpaint_end, weights=weights, config=config, seed=args.seed,
        negative_prompt=args.negative_prompt, progress=_is_leader(), generator=gen)
    if not _is_leader():
        return
    outs = [args.output] if len(prompts) == 1 else [
        f"{os.path.splitext(args.output)[0]}_{i:03d}.wav" for i in range(len(prompts))]
    for path, clip, prompt, before, after in zip(outs, result["output"], prompts,
                                                 result["initial_loss"], result["loss"]):
        audio_io.write_audio(path, np.clip(clip, -1.0, 1.0), gen.sample_rate)
        print(f"{path}: {prompt!r} ({len(clip) / gen.sample_rate:.2f} s), loss {before:.4g} "
              f"-> {after:.4g}")
    trajectory = args.json or f"{os.path.splitext(args.output)[0]}.json"
    record = {"prompts": prompts, "seeds": result["seeds"], "files": outs,
              "config": config.to_dict(), "seconds": result["clip_seconds"],
              "iterations": result["iterations"], "stopped_early": result["stopped_early"],
              "loss": result["history"].T.tolist(),
              "initial_loss": result["initial_loss"].tolist(),
              "final_loss": result["loss"].tolist(),
              "terms": {k: v.tolist() for k, v in result["terms"].items()},
              "initial_terms": {k: v.tolist() for k, v in result["initial_terms"].items()},
              "wall_seconds": result["seconds"], "compile_seconds": result["compile_seconds"],
              "seconds_per_iteration": result["seconds_per_iteration"],
              "xla_memory_bytes": result["memory_bytes"]}
    if "resampled_loss" in result:
        record["resampled_loss"] = result["resampled_loss"].tolist()
        record["initial_resampled_loss"] = result["initial_resampled_loss"].tolist()
    paths.write_text(trajectory, json.dumps(record, indent=1) + "\n")
    print(f"loss trajectory: {trajectory}")


def cmd_eval_ditto(args, cfg):
    from ldm_jax.data import builders
    from ldm_jax.diffusion import evaluate
    from ldm_jax.diffusion.config import DittoEvalConfig
    workdir = _require_workdir(args)
    section = dict((cfg.get("ditto", None) or {}).get("eval", None) or {})
    if args.max_clips:
        section["num_clips"] = args.max_clips
    if args.tasks:
        section["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    settings = DittoEvalConfig.from_dict(section, section="ditto.eval")
    optimiser = _ditto_config(args, cfg)
    data_dir = _data_dir(args, cfg)
    source = builders.open_split(data_dir, cfg.data.name, "test")
    result = evaluate.evaluate_ditto(workdir, source, settings, optimiser,
                                     progress=_is_leader())
    _print_json(result, args.json, ditto_seed=settings.seed)


def cmd_eval_generation(args, cfg):
    from ldm_jax.diffusion import evaluate as generation
    workdir = _require_workdir(args)
    from ldm_jax.diffusion.config import eval_config
    stage = stage_config(cfg, "ldm")
    e = eval_config(stage)
    e = e.replace(num_prompts=args.num_prompts or e.num_prompts, steps=args.steps or e.steps)
    result = generation.evaluate_generation(
        workdir, args.data or os.path.join(workdir, "latents"), num_prompts=e.num_prompts,
        **e.sampling(), batch_size=e.batch_size, untrained=not args.no_untrained)
    _print_json(result, args.json, ldm_seed=stage.get("seed"), eval_seed=e.seed)


def cmd_eval_controls(args, cfg):
    from ldm_jax import chain
    if "controls" not in cfg or not chain.is_chain(cfg):
        raise config_lib.ConfigError("the controls evaluation needs a chain experiment with a "
                                     "`controls` section and data built with controls, e.g. "
                                     "--config controls_tiny")
    workdir = _require_workdir(args)
    if args.ceiling:
        result = chain.controls_ceiling(cfg, workdir, num_examples=args.max_clips or None)
        _print_json(result, args.json, codec_seed=cfg.codec.seed,
                    bootstrap_seed=cfg.controls.eval.seed)
        return
    if "controlnet" not in cfg:
        raise config_lib.ConfigError("the experiment has no controlnet section: say --ceiling, "
                                     "or use --config controls_tiny")
    if not paths.isdir(os.path.join(workdir, "controlnet", "checkpoints")):
        raise config_lib.ConfigError(f"no trained ControlNet in {workdir}: run `ldm-jax train "
                                     "controlnet --workdir W` first, or say --ceiling for the "
                                     "codec's ceiling")
    result = chain.controlnet_scores(cfg, workdir, num_prompts=args.max_clips or None)
    _print_json(result, args.json, controlnet_seed=cfg.controlnet.get("seed"),
                eval_seed=cfg.controlnet.eval.seed)


def _latent_frame_rate(cfg) -> float:
    """The latent frame rate of an experiment's codec (a chain's `codec` section or a codec
    experiment's `model`)."""
    from ldm_jax.codec import CodecConfig
    section = cfg.codec.model if "codec" in cfg else cfg.model
    return CodecConfig.from_dict(section).frame_rate


def cmd_controls_extract(args, cfg):
    import json

    from ldm_jax import controls
    from ldm_jax.controls import analysis
    rate = args.frame_rate or _latent_frame_rate(cfg)
    found = controls.controls_from_file(args.input, frame_rate=rate,
                                        beats_per_bar=args.beats_per_bar)
    out = analysis.to_json(found)
    paths.write_text(args.json, json.dumps(out, indent=1) + "\n")
    if args.plot:
        analysis.plot(found, args.plot)
    have = [k for k in ("melody", "dynamics_db", "beats") if k in out]
    print(f"{args.json}: {', '.join(have)} at {rate:g} frames/s, {out['num_frames']} frames"
          + (f"; {len(out['beats'])} beats, {len(out['downbeats'])} downbeats"
             if "beats" in out else ""))


def cmd_export(args, cfg):
    from ldm_jax import export
    summary = export.export(args.stage_dir, args.output, use_ema=not args.raw)
    print(f"{summary['path']}: the {summary['family']} of {args.stage_dir} at step "
          f"{summary['step']} ({summary['parameters']:,} parameters)")


# ----------------------------------------------------------------------------------- the chain

def cmd_run(args, cfg):
    from ldm_jax import chain
    workdir = _require_workdir(args)
    stages = [x for x in (args.stages or "").split(",") if x] or None
    chain.run_chain(chain.stages_for(cfg), cfg, workdir, only=stages,
                    rerun_stale=args.rerun_stale, reuse_from=args.reuse_from)
    _print_outputs(workdir)


def cmd_demo(args, cfg):
    from ldm_jax import chain
    workdir = paths.resolve(args.workdir or os.path.join("runs", "demo"))
    if _is_leader():
        print(f"ldm-jax demo: the embedded tiny experiment into {workdir} (CPU, tiny models)")
    chain.run_chain(chain.stages_for(cfg), cfg, workdir, rerun_stale=args.rerun_stale)
    _print_outputs(workdir)


def _print_outputs(workdir: str):
    if not _is_leader():
        return
    samples = os.path.join(workdir, "samples")
    if paths.isdir(samples):
        wavs = [f for f in paths.listdir(samples) if f.endswith(".wav")]
        print(f"samples: {samples} ({len(wavs)} WAV files)")
    report = os.path.join(workdir, "report.html")
    if paths.exists(report):
        print(f"report:  {report}")


# ---------------------------------------------------------------------------------- benchmarks

def _benchmarks():
    """`benchmarks.run`: installed, or beside `ldm_jax/` in a source checkout."""
    import importlib
    try:
        return importlib.import_module("benchmarks.run")
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.run"):
            raise
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isfile(os.path.join(root, "benchmarks", "run.py")) and root not in sys.path:
            sys.path.insert(0, root)
            return importlib.import_module("benchmarks.run")
        raise config_lib.ConfigError("the benchmarks package is not importable: run `ldm-jax "
                                     "bench` from a source checkout (pip install -e .)") from e


def _xla_options(items) -> dict | None:
    import ast
    options = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise config_lib.ConfigError(f"--xla-option {item!r}: write NAME=VALUE")
        low = text.lower()
        if low in ("true", "false"):
            options[name] = low == "true"
        else:
            try:
                options[name] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                options[name] = text
    return options or None


def cmd_bench(args, cfg):
    bench = _benchmarks()
    opts = bench.Options(
        preset=args.preset, overrides=tuple(args.overrides), batch=args.batch,
        repeats=args.repeats, peak_tflops=args.peak_tflops, seconds=args.seconds,
        max_batch=args.max_batch, steps=args.steps, sampler=args.sampler, dtype=args.dtype,
        remat=None if args.remat is None else args.remat == "on", frame_rate=args.frame_rate,
        codec=args.codec, data_dir=args.data_dir, compiler_options=_xla_options(args.xla_option),
        peer=args.peer, peer_threads=args.peer_threads)
    result = bench.run_all(opts) if args.target == "all" else bench.run(args.target, opts)
    for line in bench.summary(result):
        print(line)
    if args.json:
        bench.write_json(result, args.json)
        print(f"wrote {args.json}")


# -------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ldm-jax", description="Latent diffusion for music and audio in JAX.", epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="build and inspect datasets", epilog=EPILOG)
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser("build", help="materialise a TFDS dataset (ArrayRecord)",
                            epilog=EPILOG)
    p.add_argument("name", choices=("synthetic_music", "audio_folder"))
    p.add_argument("--source", default=None, help="audio_folder: the folder of audio files")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild even if a dataset with other parameters is there")
    _add_config(p, data_dir=True)
    _add_distributed(p)
    p.set_defaults(func=cmd_data_build, leader=True)
    p = data_sub.add_parser("show", help="print examples with captions; write a log-mel PNG",
                            epilog=EPILOG)
    p.add_argument("name", choices=("synthetic_music", "audio_folder"))
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("-n", "--num", type=POSITIVE_INT, default=4, help="how many examples")
    p.add_argument("--png", default=None, help="where to write the spectrograms")
    _add_config(p, data_dir=True)
    _add_distributed(p)
    p.set_defaults(func=cmd_data_show, leader=True)

    tok = sub.add_parser("tokenizer", help="caption tokenizer", epilog=EPILOG)
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = tok_sub.add_parser("train", help="train SentencePiece on the training captions",
                           epilog=EPILOG)
    p.add_argument("--out", default=None, help="model file (default: W/tokenizer/spm.model)")
    _add_config(p, data_dir=True)
    _add_distributed(p)
    p.set_defaults(func=cmd_tokenizer_train, leader=True)

    p = sub.add_parser("run", help="run the experiment chain (each stage resumable)",
                       epilog=EPILOG)
    p.add_argument("experiment", nargs="?", default=None,
                   help="experiment file (same as --config; default: tiny)")
    p.add_argument("--stages", default=None,
                   help="comma-separated stages to run (default: all, skipping complete ones)")
    p.add_argument("--rerun-stale", action="store_true",
                   help="re-run stages whose config changed since they ran, and their followers")
    p.add_argument("--reuse-from", default=None, metavar="W",
                   help="copy each stage that is complete in chain workdir W with the same "
                        "config (and whose inputs are copied too) instead of running it")
    _add_config(p)
    _add_distributed(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("demo", help="run the embedded tiny experiment into ./runs/demo",
                       epilog=EPILOG)
    p.add_argument("--rerun-stale", action="store_true",
                   help="re-run stages whose config changed since they ran")
    _add_config(p)
    _add_distributed(p)
    p.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train one stage of the pipeline", epilog=EPILOG)
    train_sub = train.add_subparsers(dest="train_command", metavar="STAGE", required=True)
    p = train_sub.add_parser("codec", help="train the neural codec (RVQ-GAN or KL autoencoder)",
                             epilog=EPILOG)
    _add_config(p, data_dir=True, default="codec_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_train)

    p = train_sub.add_parser("clap", help="train the contrastive text-audio encoder",
                             epilog=EPILOG)
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece model (default: W/tokenizer/spm.model)")
    _add_config(p, data_dir=True, default="clap_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_train)

    p = train_sub.add_parser("judge", help="train the attribute judge (instrument, pattern, "
                             "drums from log-mel)", epilog=EPILOG)
    _add_config(p, data_dir=True, default="judge_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_train)

    p = train_sub.add_parser("ldm", help="train the latent diffusion U-Net", epilog=EPILOG)
    p.add_argument("--latents", default=None, help="latents directory (default: W/latents)")
    p.add_argument("--clap", default=None, help="trained CLAP directory (default: W/clap)")
    _add_config(p, default="ldm_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_train)

    p = train_sub.add_parser("controlnet", help="train Music ControlNet (melody, dynamics, "
                             "rhythm) on the trained U-Net of W", epilog=EPILOG)
    p.add_argument("--latents", default=None, help="latents directory (default: W/latents)")
    p.add_argument("--clap", default=None, help="trained CLAP directory (default: W/clap)")
    _add_config(p, default="controls_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_train)

    lat = sub.add_parser("latents", help="codec latents of a dataset", epilog=EPILOG)
    lat_sub = lat.add_subparsers(dest="latents_command", metavar="ACTION", required=True)
    p = lat_sub.add_parser("encode", help="encode every clip with a trained codec",
                           epilog=EPILOG)
    p.add_argument("--codec", default=None, help="codec directory or W (default: --workdir)")
    p.add_argument("--out", default=None, help="latents directory (default: W/latents)")
    p.add_argument("--overwrite", action="store_true")
    _add_config(p, data_dir=True, default="codec_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_latents_encode)

    p = sub.add_parser("generate", help="text to audio with the trained chain", epilog=EPILOG)
    p.add_argument("prompt", nargs="*", help="text prompt(s)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line")
    p.add_argument("-o", "--output", default="out.wav")
    p.add_argument("--seconds", type=POSITIVE, default=None,
                   help="clip length (default: the length the U-Net was trained on, or that of "
                        "--init-audio / --inpaint-audio)")
    p.add_argument("--steps", type=POSITIVE_INT, default=None,
                   help="sampler steps (default: the run's generation.steps)")
    p.add_argument("--sampler", default=None,
                   choices=("ddpm", "ddim", "dpmpp_2m", "dpmpp", "euler"),
                   help="(default: the run's generation.sampler)")
    p.add_argument("--cfg", type=FINITE, default=None,
                   help="classifier-free guidance scale (default: the run's "
                        "generation.cfg_scale)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=COUNT, default=None,
                   help="prompt i uses seed + i (default: the run's generation.seed)")
    p.add_argument("--init-audio", default=None, help="audio-to-audio: the clip to vary")
    p.add_argument("--strength", type=FRACTION, default=0.6)
    p.add_argument("--inpaint-audio", default=None, help="the clip to inpaint")
    p.add_argument("--inpaint-start", type=NON_NEGATIVE, default=None, help="seconds")
    p.add_argument("--inpaint-end", type=POSITIVE, default=None, help="seconds")
    g = p.add_argument_group("long-form: --seconds beyond the window (default: the training "
                             "length)")
    g.add_argument("--long-form", default=None, choices=("window", "ditto", "none"),
                   help="window: each window inpaints its overlap with the one before (the "
                        "default for text alone); ditto: each window's noise optimised to "
                        "match it; none: one piece")
    g.add_argument("--window-seconds", type=POSITIVE, default=None,
                   help="the window (default: the training length)")
    g.add_argument("--overlap-seconds", type=POSITIVE, default=None,
                   help="the overlap (default: a quarter of the window)")
    g = p.add_argument_group("time-varying controls (a ControlNet trained in W/controlnet)")
    _add_control_files(g, rhythm=True, verb="give the controls")
    g.add_argument("--control-scale", type=FINITE, default=1.0,
                   help="multiplies the ControlNet's residuals (0: text alone) [1]")
    _add_config(p, default="ldm_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ditto", help="control without training: optimise the initial noise "
                       "so the audio follows a target (DITTO)", epilog=EPILOG)
    p.add_argument("prompt", nargs="*", help="text prompt(s), each optimised on its own")
    p.add_argument("-o", "--output", default="out.wav")
    p.add_argument("--json", default=None,
                   help="the loss trajectory (default: the output's name with .json)")
    p.add_argument("--seconds", type=POSITIVE, default=None,
                   help="clip length (default: the length the U-Net was trained on)")
    p.add_argument("--seed", type=COUNT, default=0, help="prompt i starts from seed + i's noise")
    p.add_argument("--negative-prompt", default=None)
    g = p.add_argument_group("targets (as many as wanted; their losses add)")
    _add_control_files(g, rhythm=False, verb="follow the dynamics and melody")
    g.add_argument("--structure", default=None, metavar="PATTERN",
                   help="a section pattern over equal sections, e.g. AABA")
    g.add_argument("--loop", action="store_true",
                   help="make the clip loop seamlessly (written cut at its loop point)")
    g.add_argument("--loop-seconds", type=POSITIVE, default=0.4,
                   help="the end region matched to the start [0.4]")
    g.add_argument("--outpaint", default=None, metavar="IN.wav",
                   help="continue this clip (written as IN followed by the continuation)")
    g.add_argument("--outpaint-seconds", type=POSITIVE, default=None,
                   help="the overlap matched to IN's end (default: half the clip)")
    g.add_argument("--inpaint", default=None, metavar="IN.wav",
                   help="regenerate a range of this clip, keeping the rest")
    g.add_argument("--inpaint-start", type=NON_NEGATIVE, default=None, help="seconds")
    g.add_argument("--inpaint-end", type=POSITIVE, default=None, help="seconds")
    g.add_argument("--weight", action="append", default=None, metavar="TASK=W",
                   help="a loss weight, e.g. --weight melody=0.5 (default 1 each)")
    g = p.add_argument_group("optimisation (default: the experiment's ditto.optimise)")
    g.add_argument("--iterations", type=POSITIVE_INT, default=None, help="Adam steps K")
    g.add_argument("--lr", type=POSITIVE, default=None, help="Adam's learning rate")
    g.add_argument("--sampler", default=None, choices=("ddim", "dpmpp_2m"),
                   help="the deterministic sampler differentiated")
    g.add_argument("--sampler-steps", type=POSITIVE_INT, default=None, help="its steps S")
    g.add_argument("--cfg", type=FINITE, default=None, help="classifier-free guidance scale")
    g.add_argument("--tolerance", type=NON_NEGATIVE, default=None,
                   help="stop once every clip's loss is at most this")
    g.add_argument("--resample-steps", type=COUNT, default=None,
                   help="also sample the optimised noise with this many steps (reported)")
    _add_config(p, default="controls_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_ditto)

    ev = sub.add_parser("eval", help="evaluate a trained stage", epilog=EPILOG)
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    p = ev_sub.add_parser("generation", help="Frechet CLAP distance, CLAP score, adherence",
                          epilog=EPILOG)
    p.add_argument("--json", default=None)
    p.add_argument("--data", default=None, help="latents or data dir (default: W/latents)")
    p.add_argument("--num-prompts", type=POSITIVE_INT, default=None)
    p.add_argument("--steps", type=POSITIVE_INT, default=None)
    p.add_argument("--no-untrained", action="store_true",
                   help="skip the baseline scores of the U-Net at initialisation")
    _add_config(p, default="ldm_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_eval_generation)

    p = ev_sub.add_parser("controls", help="how closely the ControlNet's clips follow the test "
                          "clips' melody, dynamics and beats (with --ceiling: the controls of "
                          "real and codec-reconstructed test clips)", epilog=EPILOG)
    p.add_argument("--ceiling", action="store_true",
                   help="score real test clips and their codec reconstructions against the "
                        "ground truth stored with them (what the codec lets through)")
    p.add_argument("--json", default=None, help="write the scores here")
    p.add_argument("--max-clips", type=COUNT, default=0, help="score at most N clips (0: the "
                   "config's controls.eval.num_examples, or controlnet.eval.num_prompts)")
    _add_config(p, default="controls_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_eval_controls)

    p = ev_sub.add_parser("ditto", help="DITTO's control errors before and after optimising "
                          "the noise, against plain sampling and the ControlNet", epilog=EPILOG)
    p.add_argument("--json", default=None, help="write the scores here")
    p.add_argument("--max-clips", type=COUNT, default=0,
                   help="score at most N test clips (0: the config's ditto.eval.num_clips)")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="intensity, melody, structure, loop, outpaint (default: all)")
    for name, kind, what in (("iterations", POSITIVE_INT, "Adam steps K"),
                             ("lr", POSITIVE, "Adam's learning rate"),
                             ("sampler-steps", POSITIVE_INT, "sampler steps S"),
                             ("resample-steps", COUNT, "also resample with this many steps")):
        p.add_argument(f"--{name}", type=kind, default=None, help=what)
    p.set_defaults(sampler=None, cfg=None, tolerance=None)
    _add_config(p, data_dir=True, default="controls_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_eval_ditto)

    clap = sub.add_parser("clap", help="use a trained CLAP: evaluate, retrieve", epilog=EPILOG)
    clap_sub = clap.add_subparsers(dest="clap_command", metavar="ACTION", required=True)
    p = clap_sub.add_parser("eval", help="retrieval recall and zero-shot accuracy",
                            epilog=EPILOG)
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument("--split", default="test", choices=("train", "test"))
    _add_config(p, data_dir=True, default="clap_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_clap_eval)
    p = clap_sub.add_parser("retrieve", help="rank clips by similarity to a text query",
                            epilog=EPILOG)
    p.add_argument("--query", required=True)
    p.add_argument("--top", type=POSITIVE_INT, default=5)
    p.add_argument("--split", default="test", choices=("train", "test"))
    _add_config(p, data_dir=True, default="clap_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_clap_retrieve)

    codec = sub.add_parser("codec", help="use a codec: encode, decode, evaluate, import",
                           epilog=EPILOG)
    codec_sub = codec.add_subparsers(dest="codec_command", metavar="ACTION", required=True)
    for name, helptext, func in (("encode", "audio file -> codes.npz", cmd_codec_encode),
                                 ("decode", "codes.npz -> audio file", cmd_codec_decode)):
        p = codec_sub.add_parser(name, help=helptext, epilog=EPILOG)
        p.add_argument("input")
        p.add_argument("-o", "--output", required=True)
        p.add_argument("--codec", default=None, help="a codec directory (instead of --workdir)")
        p.add_argument("--n-codebooks", type=POSITIVE_INT, default=None,
                       help="use only the first K codebooks (lower bitrate)")
        if name == "encode":
            p.add_argument("--bandwidth", type=POSITIVE, default=None, metavar="KBPS",
                           help="as many codebooks as fit this bitrate (EnCodec's "
                                "bandwidths, e.g. 6 for 6 kbps)")
        _add_config(p, default="codec_tiny")
        _add_distributed(p)
        p.set_defaults(func=func, leader=True)
    p = codec_sub.add_parser("eval", help="reconstruction metrics on the test split",
                             epilog=EPILOG)
    p.add_argument("--codec", default=None, help="a codec directory (instead of --workdir)")
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--n-codebooks", type=POSITIVE_INT, default=None)
    p.add_argument("--max-clips", type=COUNT, default=0, help="evaluate at most N clips (0: all)")
    _add_config(p, data_dir=True, default="codec_tiny")
    _add_distributed(p)
    p.set_defaults(func=cmd_codec_eval)
    p = codec_sub.add_parser("import-dac", help="import a released DAC .pth checkpoint",
                             epilog=EPILOG)
    p.add_argument("weights", help="DAC weights .pth (read without executing pickled code)")
    p.add_argument("--out", required=True, help="codec directory to write")
    _add_config(p, workdir=False)
    _add_distributed(p)
    p.set_defaults(func=cmd_codec_import_dac, leader=True)
    p = codec_sub.add_parser("import-encodec", help="import an EnCodec .th checkpoint",
                             epilog=EPILOG)
    p.add_argument("weights", help="EnCodec state dict .th (read without executing pickled "
                                   "code); the released 24 and 48 kHz layouts are recognised")
    p.add_argument("--out", required=True, help="codec directory to write")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="EnCodec's constructor arguments (seanet_encoder, seanet_decoder, "
                        "quantizer, model) for a model that is not a release")
    _add_distributed(p)
    p.set_defaults(func=cmd_codec_import_encodec, leader=True, loads_config=False)

    ctl = sub.add_parser("controls", help="musical controls: melody, dynamics, rhythm",
                         epilog=EPILOG)
    ctl_sub = ctl.add_subparsers(dest="controls_command", metavar="ACTION", required=True)
    p = ctl_sub.add_parser("extract", help="controls of an audio file, a MIDI file or a "
                           "dynamics CSV (time,db) as JSON", epilog=EPILOG)
    p.add_argument("input", help="audio (.wav .flac .mp3 .ogg), MIDI (.mid) or CSV (time,db)")
    p.add_argument("--json", required=True, help="write the controls here")
    p.add_argument("--frame-rate", type=POSITIVE, default=None, metavar="HZ",
                   help="control frames per second (default: the latent frame rate of the "
                        "config's codec, 50 for tiny)")
    p.add_argument("--beats-per-bar", type=POSITIVE_INT, default=4,
                   help="for the downbeat estimate of audio (default 4)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the controls")
    _add_config(p, workdir=False)
    p.set_defaults(func=cmd_controls_extract)

    p = sub.add_parser("export", help="a trained stage as one portable model file",
                       epilog="ldm_jax.codec.load, ldm_jax.clap.load and ldm_jax.diffusion.load "
                              "read the file.")
    p.add_argument("stage_dir", help="a trained stage directory: W/codec, W/clap or W/ldm")
    p.add_argument("-o", "--output", required=True, help="the model file (.msgpack)")
    p.add_argument("--raw", action="store_true",
                   help="the raw parameters instead of their moving average")
    _add_distributed(p)
    p.set_defaults(func=cmd_export, leader=True, loads_config=False)

    p = sub.add_parser(
        "bench", help="benchmark a stage: step time, compile time, FLOPs, MFU, memory",
        epilog="--config.SECTION.KEY=VALUE overrides a field of the preset. Results: "
               "benchmarks/README.md.")
    p.add_argument("target", choices=("data", "codec", "clap", "unet", "sample", "all"),
                   help="what to measure; all: every target on its CPU-sized preset")
    p.add_argument("--preset", default=None, metavar="FILE[:ARG]",
                   help="experiment (default on CPU: tiny, codec_tiny, clap_tiny, ldm_tiny; on "
                        "accelerators: tiny, codec:dac_44khz, clap_base, ldm_base)")
    p.add_argument("--batch", type=POSITIVE_INT, default=None,
                   help="default: the preset's batch size")
    p.add_argument("--repeats", type=POSITIVE_INT, default=None,
                   help="timed calls (default 5 on CPU, 20 on accelerators; data: 40 batches; "
                        "sample: 3 / 10)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--peak-tflops", type=POSITIVE, default=None,
                   help="device peak for MFU (default: the table of benchmarks/hardware.py; "
                        "none on CPU)")
    p.add_argument("--seconds", type=POSITIVE, default=None,
                   help="audio length for codec encode/decode and sampling (default 10; bench "
                        "all samples 2 s)")
    p.add_argument("--max-batch", type=POSITIVE_INT, default=None,
                   help="sample: double the batch from 1 up to this or an out-of-memory error "
                        "(default 4 on CPU, 64 on accelerators)")
    p.add_argument("--steps", type=POSITIVE_INT, default=50,
                   help="sample: sampler steps (default 50)")
    p.add_argument("--sampler", default="dpmpp_2m", choices=("dpmpp_2m", "ddim", "euler", "ddpm"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="override the model's compute dtype")
    p.add_argument("--remat", default=None, choices=("on", "off"),
                   help="override rematerialisation (CLAP, U-Net)")
    p.add_argument("--frame-rate", type=POSITIVE, default=None,
                   help="unet/sample: latent frames per second (default: the paired codec's: "
                        "ldm_tiny 400 (codec_tiny:vae), ldm_base 86.13 (codec:vae), a chain "
                        "experiment's own codec)")
    p.add_argument("--codec", default=None, metavar="FILE[:ARG]",
                   help="unet/sample: the codec experiment paired with the LDM preset")
    p.add_argument("--data-dir", default=None,
                   help="data: a TFDS directory (default: a temporary build)")
    p.add_argument("--xla-option", action="append", default=None, metavar="NAME=VALUE",
                   help="XLA compiler option for every compilation (repeatable)")
    p.add_argument("--peer", action="store_true",
                   help="unet, codec: also time the PyTorch peer (U-Net, DAC) on the same device "
                        "in this process and record ours/peer (needs torch)")
    p.add_argument("--peer-threads", type=POSITIVE_INT, default=None, metavar="N",
                   help="torch intra-op threads of a CPU peer (default: torch's own)")
    p.set_defaults(func=cmd_bench, loads_config=False)
    return parser


def _user_error(e: BaseException) -> bool:
    """Errors raised on purpose by ldm_jax for a user's mistake (their message says what to do)."""
    return isinstance(e, (ValueError, RuntimeError, FileNotFoundError, KeyError)) and \
        type(e).__module__.startswith("ldm_jax")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = config_lib.split_config_args(argv)
    except config_lib.ConfigError as e:
        print(f"ldm-jax: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(rest)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    try:
        if hasattr(args, "coordinator"):
            from ldm_jax import parallel
            parallel.initialize_distributed(args.coordinator, args.num_processes,
                                            args.process_id)
        spec = getattr(args, "experiment", None) or getattr(args, "config", None)
        if getattr(args, "loads_config", True):
            cfg = config_lib.get_config(spec, overrides)
        else:  # `bench` loads each target's preset itself
            cfg, args.overrides = None, overrides
        if getattr(args, "leader", False):
            from ldm_jax import parallel
            # One dataset or file written from host code: process 0 does it, the others wait.
            name = " ".join(filter(None, (args.command,
                                          getattr(args, f"{args.command}_command", None))))
            parallel.on_leader(f"ldm-jax {name}", lambda: args.func(args, cfg))
        else:
            args.func(args, cfg)
    except KeyboardInterrupt:
        print("ldm-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — one line for a user's mistake, a traceback otherwise
        if not _user_error(e):
            raise
        print(f"ldm-jax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
