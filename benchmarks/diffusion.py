"""Latent diffusion benchmark: U-Net train-step time and MFU; sampling real-time factor.

    python benchmarks/diffusion.py --config ldm_tiny --json out.json
    python benchmarks/diffusion.py --config ldm_base --batch 32 --json out.json   # accelerator
    python benchmarks/diffusion.py --config ldm_base --skip-speed   # parameters, FLOPs/step

The measurements are `benchmarks.run.bench_unet` and `bench_sample` (`ldm-jax bench unet`,
`ldm-jax bench sample`): the `ldm_jax.diffusion.train` step on random latents of
`data.crop_seconds` at the paired codec's frame rate with random text conditions, then
`--steps` of DPM-Solver++ 2M with classifier-free guidance (one doubled batch) and the codec
decode for `--seconds` of audio, at batch 1, 2, 4, ... up to `--max-batch`, with a randomly
initialised U-Net and codec. `--skip-speed` compiles the step at batch 1 and reports only the
parameter count and XLA's FLOPs per step (nothing runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import hardware, inputs, run  # noqa: E402


def step_cost(opts: run.Options) -> dict:
    """Parameters and FLOPs of the train step at `opts.batch`, from its compiled cost analysis
    (shapes only: no parameter is allocated and nothing runs)."""
    import jax
    import numpy as np

    from ldm_jax.diffusion import train as ldm_train

    ldm = run.ldm_setup(opts, "unet")
    s, batch = ldm.section, opts.batch or 1
    frames = int(round(float(s.data.crop_seconds) * ldm.frame_rate))
    arrays = {"latents": np.zeros((batch, frames, int(s.model.latent_channels)), np.float32),
              "latents_mask": np.ones((batch, frames), bool),
              **inputs.random_condition(s, batch, np.random.default_rng(0))}
    state = jax.eval_shape(functools.partial(ldm_train.init_state, s), jax.random.key(0))
    start = time.perf_counter()
    lowered = jax.jit(functools.partial(ldm_train.train_step, cfg=s), donate_argnums=(0,)).lower(
        state, arrays, jax.random.key(1))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory, source = hardware.peak_memory(compiled)
    return {"preset": ldm.spec, **hardware.environment(), "dtype": s.model.dtype,
            "remat": s.model.remat, "params": run.param_count(state["params"]), "batch": batch,
            "frames": frames, "frame_rate": ldm.frame_rate, "compile_s": compile_s,
            "flops_per_step": hardware.cost_flops(compiled.cost_analysis()),
            "peak_memory_bytes": memory, "peak_memory_source": source}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="LDM preset (default: ldm_tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="train batch (default: the preset's)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--seconds", type=float, default=10.0, help="audio sampled")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--max-batch", type=int, default=None, help="largest sampling batch tried")
    p.add_argument("--frame-rate", type=float, default=None)
    p.add_argument("--codec", default=None, help="codec experiment paired with the preset")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--skip-sample", action="store_true", help="only the train step")
    p.add_argument("--skip-speed", action="store_true",
                   help="only parameters and FLOPs per step (compiled, not run)")
    p.add_argument("--json", default=None)
    args, overrides = p.parse_known_args(argv)
    opts = run.Options(preset=args.config, overrides=tuple(o.removeprefix("--config.")
                                                           for o in overrides),
                       batch=args.batch, repeats=args.repeats, seconds=args.seconds,
                       steps=args.steps, max_batch=args.max_batch, frame_rate=args.frame_rate,
                       codec=args.codec, peak_tflops=args.peak_tflops)
    result = {"command": " ".join(sys.argv)}
    if args.skip_speed:
        result["cost"] = step_cost(opts)
    else:
        result["unet"] = run.bench_unet(opts)
        for line in run.summary(result["unet"]):
            print(line)
        if not args.skip_sample:
            result["sample"] = run.bench_sample(dataclasses.replace(opts, batch=None))
            for line in run.summary(result["sample"]):
                print(line)
    run.emit(result, args.json)


if __name__ == "__main__":
    main()
