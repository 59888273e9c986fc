"""Codec variants trained side by side on one dataset: quality, loudness and step time.

    python -m benchmarks.codec_variants --workdir W --json out.json \
        --variant conv: --variant istft:codec.model.decoder=istft

Each `--variant NAME:KEY=VALUE,KEY=VALUE` is the chain experiment (`--config`, default `tiny`)
with those overrides. The dataset is built once (`W/data`); each variant's codec trains for the
experiment's `codec.train.steps` (or `--steps`) into `W/NAME`, then is scored on the test clips
by `ldm_jax.codec.inference.evaluate` (mel distance, SI-SDR, BS.1770 loudness difference, each
with N and a bootstrap interval). The variants after the first are compared with it clip by clip:
the relative change of the mean mel distance with a paired bootstrap interval, and a Wilcoxon
signed-rank p-value. The train step (generator and discriminator) and the decoding of 10 s are
timed by `benchmarks.run.bench_codec` in this same process, one variant after the other.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.stats

from benchmarks import run
from ldm_jax import chain, provenance
from ldm_jax import config as config_lib
from ldm_jax.codec import inference
from ldm_jax.data import builders


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    if not name or not name.isidentifier():
        raise config_lib.ConfigError(f"--variant {text!r}: give NAME:KEY=VALUE,KEY=VALUE")
    return name, [o for o in overrides.split(",") if o]


def paired_change(base: list[float], other: list[float], *, seed: int = 0,
                  n: int = 2000) -> dict:
    """Relative change of the mean, `mean(other) / mean(base) - 1`, with a paired percentile
    bootstrap interval over clips and a two-sided Wilcoxon signed-rank p-value."""
    a, b = np.asarray(base, np.float64), np.asarray(other, np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, (n, a.size))
    ratios = b[idx].mean(axis=1) / a[idx].mean(axis=1) - 1.0
    lo, hi = np.quantile(ratios, [0.025, 0.975])
    return {"relative_change": float(b.mean() / a.mean() - 1.0), "ci95": [float(lo), float(hi)],
            "wilcoxon_p": float(scipy.stats.wilcoxon(a, b).pvalue), "n": int(a.size)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="a chain experiment")
    p.add_argument("--workdir", required=True)
    p.add_argument("--variant", action="append", required=True, metavar="NAME:OVERRIDES")
    p.add_argument("--steps", type=int, default=None, help="codec steps (default: the config's)")
    p.add_argument("--max-clips", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed train steps per variant")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    data_dir = os.path.abspath(os.path.join(args.workdir, "data"))
    base_cfg = config_lib.get_config(args.config, [])
    chain.run_chain(chain.stages_for(base_cfg), base_cfg, args.workdir, only=["data"])
    result = {"command": "python -m benchmarks.codec_variants " + " ".join(argv or []),
              "config": args.config, "variants": {}}
    per_clip = {}
    for name, overrides in variants:
        overrides = overrides + [f"data.data_dir={data_dir}"]
        if args.steps:
            overrides.append(f"codec.train.steps={args.steps}")
        cfg = config_lib.get_config(args.config, overrides)
        workdir = os.path.join(args.workdir, name)
        start = time.time()
        chain.train_stage("codec", cfg.codec, chain.layout(cfg, workdir))
        train_s = time.time() - start
        loaded = inference.load_trained(os.path.join(workdir, "codec"))
        clips = builders.Column(builders.open_split(data_dir, cfg.data.name, "test"), "audio",
                                args.max_clips)
        scores = inference.evaluate(loaded, clips, per_clip=True)
        per_clip[name] = scores.pop("per_clip")
        speed = run.bench_codec(run.Options(preset=args.config, overrides=tuple(overrides),
                                            repeats=args.repeats))
        result["variants"][name] = {
            "overrides": overrides, "steps": int(cfg.codec.train.steps),
            "train_wall_s": train_s, "scores": scores,
            "params": speed["params"], "decoder_params": speed["decoder_params"],
            "train_step_s": speed["step_s"], "decode_10s": speed["decode"],
            "encode_10s": speed["encode"]}
    base = variants[0][0]
    result["compared_with"] = base
    for name, _ in variants[1:]:
        result["variants"][name]["against_" + base] = {
            metric: paired_change(per_clip[base][metric], per_clip[name][metric])
            for metric in ("mel_distance", "stft_distance")}
    result["provenance"] = provenance.record()
    run.emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
