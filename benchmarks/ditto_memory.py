"""XLA's memory estimate of one DITTO iteration against the sampler's steps, on a trained chain.

    PYTHONPATH=. python benchmarks/ditto_memory.py W [--seconds 2] [--batch 8] --json OUT.json

For S in 10, 25 and 50 DDIM steps, with every step checkpointed (DITTO's default) and without,
the iteration (guided sampling, codec decoder, intensity loss, gradient, Adam) is compiled for
a batch of candidates and XLA's memory analysis is read: arguments + outputs + temporaries.
Nothing is run.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", default="10,25,50")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from ldm_jax import parallel, provenance
    from ldm_jax.diffusion import ditto, generate

    gen = generate.Generator(args.workdir, batch_size=args.batch)
    runner = ditto.Ditto(gen)
    frames, samples, feature_frames = runner.frames(args.seconds)
    term = ditto.fit_frames(ditto.intensity(np.full(feature_frames, -30.0)), feature_frames,
                            frames)
    prompts = ["a calm melody"] * args.batch
    cond = gen.condition(prompts)
    context = {"cond": cond, "uncond": gen.unconditional(cond), "scale": np.float32(3.0)}
    x = gen.initial_noise(range(args.batch), frames)
    rows = []
    for remat in (True, False):
        for steps in (int(s) for s in args.steps.split(",")):
            config = ditto.DittoConfig(sampler_steps=steps, remat=remat)
            step, optimizer = ditto.make_step(runner.problem(samples, True), [term], config)
            state = ditto.init_state(optimizer, jax.numpy.asarray(x))
            start = time.perf_counter()
            compiled = jax.jit(step).lower(gen.params, gen.codec.variables, state, context,
                                           [dict(term.arrays)]).compile()
            rows.append({"steps": steps, "remat": remat,
                         "memory_bytes": parallel.memory_estimate(compiled),
                         "compile_seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    for remat in (True, False):
        mine = [r for r in rows if r["remat"] == remat]
        print(f"remat={remat}: S={mine[-1]['steps']} / S={mine[0]['steps']} = "
              f"{mine[-1]['memory_bytes'] / mine[0]['memory_bytes']:.3f}")
    if args.json:
        record = {"workdir": args.workdir, "seconds": args.seconds, "batch": args.batch,
                  "rows": rows, "provenance": provenance.record()}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
