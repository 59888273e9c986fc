"""Inputs of the scaling estimate in SCALING.md: step FLOPs and collective bytes per step.

    python benchmarks/scaling.py flops --config ldm_base --json /tmp/ldm_flops.json
    python benchmarks/scaling.py flops --config codec:dac_44khz --json /tmp/dac_flops.json
    python benchmarks/scaling.py collectives --config ldm_tiny --config.model.dtype=bfloat16 \
        --config.model.remat=True --json /tmp/ldm_coll.json

`flops` lowers the train step for one device at batch 1 and 2 and reads XLA's cost analysis of
the lowered HLO: the difference is the cost of one example, the rest the per-step cost that does
not grow with the batch (optimiser, EMA). `--compiled` reads the cost analysis of the compiled
program instead (the same dot and convolution FLOPs; minutes more on a CPU).

`collectives` compiles the step for 8 simulated CPU devices, data-parallel (data = 8) and FSDP
(fsdp = 8), and sums its collectives with `hlo.py`, also per byte of parameters so that a tiny
preset's ratios can be scaled to a full-size one.

The step is the one `ldm_jax.loop.train` runs: `ldm_jax.diffusion.train.train_step` for LDM
configs (latent crops of `data.crop_seconds` at the codec frame rate given by `--frame-rate`,
`tokenizer.max_length` text tokens), `ldm_jax.codec.train.train_step` for codec configs (crops
of `data.crop_seconds`).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _step_and_inputs(cfg, batch: int, frame_rate: float):
    """(step, abstract state, abstract batch, parameter groups) of an LDM or codec config."""
    import jax
    import jax.numpy as jnp

    sds = jax.ShapeDtypeStruct
    key = jax.random.key(0)
    if "diffusion" in cfg:
        from ldm_jax.diffusion import train as ldm_train
        from ldm_jax.diffusion.unet import make_unet
        multiple = make_unet(cfg.model).frame_multiple
        frames = int(math.ceil(float(cfg.data.crop_seconds) * frame_rate / multiple) * multiple)
        tokens = int(cfg.tokenizer.max_length)
        m = cfg.model
        state = jax.eval_shape(functools.partial(ldm_train.init_state, cfg), key)
        inputs = {"latents": sds((batch, frames, m.latent_channels), jnp.float32),
                  "latents_mask": sds((batch, frames), jnp.bool_),
                  "context": sds((batch, tokens, m.context_dim), jnp.float32),
                  "context_mask": sds((batch, tokens), jnp.bool_),
                  "pooled": sds((batch, m.pooled_dim), jnp.float32)}
        return functools.partial(ldm_train.train_step, cfg=cfg), state, inputs, ("params",)
    from ldm_jax.codec import train as codec_train
    samples = codec_train.crop_samples(cfg)
    state = jax.eval_shape(lambda r: codec_train.init_state(cfg, r, crop_samples=samples), key)
    inputs = {"audio": sds((batch, samples, int(cfg.model.channels)), jnp.float32)}
    return (functools.partial(codec_train.train_step, cfg=cfg), state, inputs,
            ("params", "disc_params"))


def _param_bytes(state, groups) -> int:
    import jax
    return sum(math.prod(x.shape) * x.dtype.itemsize
               for g in groups for x in jax.tree_util.tree_leaves(state[g]))


def flops(cfg, frame_rate: float, compiled: bool = False) -> dict:
    """Per-example and per-step-fixed FLOPs of the single-device train step."""
    import flax.linen as nn
    import jax
    costs, seconds = {}, {}
    for batch in (1, 2):
        step, state, inputs, groups = _step_and_inputs(cfg, batch, frame_rate)
        start = time.perf_counter()
        lowered = jax.jit(step).lower(nn.meta.unbox(state), inputs, jax.random.key(0))
        analysis = lowered.compile().cost_analysis() if compiled else lowered.cost_analysis()
        if isinstance(analysis, list):
            analysis = analysis[0]
        costs[batch] = float(analysis["flops"])
        seconds[batch] = time.perf_counter() - start
    return {"flops_batch_1": costs[1], "flops_batch_2": costs[2],
            "flops_per_example": costs[2] - costs[1], "flops_per_step_fixed": 2 * costs[1]
            - costs[2], "param_bytes": _param_bytes(state, groups),
            "source": "compiled" if compiled else "lowered", "seconds": seconds,
            "shapes": {k: list(v.shape) for k, v in inputs.items()}}


def collectives(cfg, frame_rate: float, batch: int) -> dict:
    """Collective totals of the step on 8 CPU devices, data-parallel and FSDP."""
    import flax.linen as nn
    import jax

    from benchmarks import hlo
    from ldm_jax import parallel

    step, state, inputs, groups = _step_and_inputs(cfg, batch, frame_rate)
    param_bytes = _param_bytes(state, groups)
    out = {"param_bytes": param_bytes, "batch": batch, "devices": jax.device_count()}
    for name, mesh_cfg in (("dp", {"data": -1, "fsdp": 1, "tensor": 1}),
                           ("fsdp", {"data": 1, "fsdp": -1, "tensor": 1})):
        mesh = parallel.make_mesh(mesh_cfg)
        shardings = parallel.tree_shardings(state, mesh)
        start = time.perf_counter()
        plain = nn.meta.unbox(state)
        with jax.set_mesh(mesh):
            jitted = jax.jit(step, donate_argnums=(0,),
                             in_shardings=(shardings, parallel.batch_shardings(mesh, inputs),
                                           parallel.replicated(mesh)),
                             out_shardings=(shardings, parallel.replicated(mesh)))
            text = jitted.lower(plain, inputs, jax.random.key(0)).compile().as_text()
        ops = hlo.collectives(text)
        totals = hlo.summary(ops)
        by_dtype = {}
        for e in ops:
            key = f"{e['op']}/{e['dtype']}"
            by_dtype[key] = by_dtype.get(key, 0) + e["bytes"]
        out[name] = {"summary": totals, "bytes_by_op_and_dtype": by_dtype,
                     "per_param_byte": {op: row["bytes"] / param_bytes
                                        for op, row in totals.items()},
                     "compile_s": time.perf_counter() - start}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("flops", "collectives"))
    p.add_argument("--config", required=True)
    p.add_argument("--frame-rate", type=float, default=44100 / 512,
                   help="latent frames per second for LDM configs (default: DAC 44.1 kHz hop)")
    p.add_argument("--batch", type=int, default=8, help="global batch for `collectives`")
    p.add_argument("--compiled", action="store_true", help="cost analysis after compiling")
    p.add_argument("--json", default=None)
    args, overrides = p.parse_known_args(argv)
    if args.what == "collectives":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from ldm_jax import config as config_lib
    cfg = config_lib.get_config(args.config, [o.removeprefix("--config.") for o in overrides])
    from benchmarks import hardware, run
    result = {"command": " ".join(sys.argv), "config": args.config, "overrides": overrides,
              **hardware.environment()}
    if args.what == "flops":
        result["flops"] = flops(cfg, args.frame_rate, args.compiled)
    else:
        result["collectives"] = collectives(cfg, args.frame_rate, args.batch)
    run.emit(result, args.json)


if __name__ == "__main__":
    main()
