"""Multi-host coordination checks run as the processes of one JAX cluster (see `test_hosts.py`).

Each process runs every check below and writes what it saw to `OUT/host{index}.json`; a check
that would hang on several hosts is cut by the test's timeout. The checks:

- `gather`: `gather_objects`, `broadcast_from_leader`, `map_batches` (who computed which batch)
  and `host_local` of a sharded and a replicated global array;
- `leader`: `on_leader` returning a shared result, and a failure on process 0 reaching every
  host; a checkpoint manager opened in a leader-only section (the chain's old codec_eval) is a
  MultiHostError there, and the others hear of it instead of waiting;
- `read`: a checkpoint written jointly by every host, read by process 0 alone
  (`checkpoint.read_state`) while the others wait at a barrier;
- `chain`: stages whose completeness each host would judge differently are skipped or run by
  all of them alike, because process 0 decides;
- `controlnet`: a ControlNet trained by the loop over a frozen U-Net, both FSDP-sharded over
  the hosts (the U-Net's values placed by the Task's warm start), against one host's run;
- `clap_eval`: CLAP trained by the loop, evaluated at the end on parameters that span the
  hosts (the evaluation that failed on two hosts), against the same evaluation of the
  gathered parameters; and an evaluation that reads a sharded parameter without gathering
  it, which must fail with a message saying so.

    python tests/hosts_main.py --out O --workdir W
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def check_gather() -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ldm_jax import parallel

    index = jax.process_index()
    out = {"objects": parallel.gather_objects({"host": index, "text": "x" * (3 + 5 * index)}),
           "broadcast": parallel.broadcast_from_leader(f"from {index}"),
           "batches": parallel.map_batches(lambda rows: [index, list(rows)], 7, 2),
           "any": parallel.any_host(index == 1)}
    mesh = parallel.make_mesh()
    value = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    sharded = jax.make_array_from_callback(value.shape, NamedSharding(mesh, P("data")),
                                           lambda i: value[i])
    replicated = jax.make_array_from_callback(value.shape, NamedSharding(mesh, P()),
                                              lambda i: value[i])
    local = parallel.host_local({"sharded": sharded, "replicated": replicated})
    out["host_local"] = {k: bool(np.array_equal(np.asarray(v), value)) for k, v in local.items()}
    return out


def check_leader(workdir: str) -> dict:
    from ldm_jax import parallel
    from ldm_jax.checkpoint import Checkpointer

    out = {"shared": parallel.on_leader("a shared answer", lambda: {"answer": 42}, share=True)}

    def fail():
        raise ValueError("no such dataset\nsecond line")

    def open_manager():
        Checkpointer(os.path.join(workdir, "leader_manager"))

    for name, fn in (("failure", fail), ("manager", open_manager)):
        try:
            parallel.on_leader(f"check {name}", fn)
            out[name] = None
        except Exception as e:  # noqa: BLE001 — the test looks at what each host raised
            out[name] = [type(e).__name__, str(e)]
    return out


def check_read(workdir: str) -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ldm_jax import checkpoint, parallel

    mesh = parallel.make_mesh()
    value = np.arange(16, dtype=np.float32).reshape(8, 2)
    state = {"step": np.asarray(3, np.int32), "params": {"w": jax.make_array_from_callback(
        value.shape, NamedSharding(mesh, P("data")), lambda i: value[i])}}
    directory = os.path.join(workdir, "joint")
    ck = checkpoint.Checkpointer(directory)
    ck.save(3, state)
    ck.close()

    def read():
        saved, step = checkpoint.read_state(directory)
        return {"step": step, "equal": bool(np.array_equal(saved["params"]["w"], value)),
                "type": type(saved["params"]["w"]).__name__,
                "latest": checkpoint.latest_step(directory)}

    return parallel.on_leader("a read by process 0", read, share=True)


def check_chain(workdir: str) -> dict:
    import jax
    import ml_collections

    from ldm_jax import chain, paths

    ran = []

    def stage(name, all_hosts, done):
        def run(cfg, w):
            ran.append(name)
            return {"by": jax.process_index()}

        return chain.Stage(name, (), (), done, run, (), all_hosts=all_hosts)

    # Each host sees the file system differently: process 0 finds "seen_done" complete and
    # "seen_missing" not; the other hosts the reverse. Process 0's view must win everywhere.
    leader = jax.process_index() == 0
    stages = [stage("seen_done", True, lambda cfg, w: leader),
              stage("seen_missing", True, lambda cfg, w: not leader),
              stage("alone", False, lambda cfg, w: False)]
    root = os.path.join(workdir, "chain")
    if leader:
        paths.write_text(os.path.join(root, "stages", "seen_done.json"),
                         json.dumps({"config": {}, "summary": {"earlier": True}}))
    summaries = chain.run_chain(stages, ml_collections.ConfigDict(), root,
                                print_fn=lambda *a: None)
    return {"ran": ran, "summaries": {k: {x: y for x, y in v.items() if x != "seconds"}
                                      for k, v in summaries.items()}}


def check_clap_eval(workdir: str) -> dict:
    import jax
    import numpy as np

    from ldm_jax import config as config_lib
    from ldm_jax import loop, parallel
    from ldm_jax.clap import evaluate as clap_eval
    from ldm_jax.clap import train as clap_train
    from ldm_jax.clap.text import Tokenizer
    from ldm_jax.data import pipeline

    cfg = config_lib.get_config("clap_tiny", [
        "data.sample_rate=8000", "data.crop_seconds=0.4", "tokenizer.vocab_size=40",
        "tokenizer.max_length=12", "model.embed_dim=8", "model.text.width=16",
        "model.text.num_layers=1", "model.text.num_heads=2", "model.audio.width=16",
        "model.audio.num_layers=1", "model.audio.num_heads=2", "model.audio.max_seconds=0.5",
        "model.audio.n_fft=256", "model.audio.hop_length=128", "model.audio.n_mels=16",
        "train.batch_size=4", "train.warmup=1", "eval.batch_size=4"])
    rng = np.random.default_rng(0)
    words = ("organ", "bell", "piano", "drum")
    source = [{"audio": rng.standard_normal(3200).astype(np.float32) * 0.1,
               "caption": f"a {words[i % 4]} piece number {i}", "instrument": "organ"}
              for i in range(8)]
    tokenizer = Tokenizer.train([s["caption"] for s in source] * 4, vocab_size=40)
    # CLAP's own stage as the chain runs it: the loop evaluates the global state (its arrays
    # span both hosts) after training, every host evaluating its batches of the test split.
    mesh = parallel.make_mesh(cfg.mesh)
    task = clap_train.make_task(cfg, tokenizer,
                                evaluate=clap_eval.make_evaluator(cfg, source, tokenizer))
    iterator = pipeline.make_iterator(source, cfg.data,
                                      batch_size=parallel.per_host_batch(4, mesh),
                                      fields=clap_train.read_fields(source))
    result = loop.train(task, iterator, workdir=os.path.join(workdir, "clap"), num_steps=2,
                        mesh=mesh, checkpoint_cfg={"every_steps": 0},
                        log_cfg={"every_steps": 1, "progress": False})
    metrics = {k[len("eval/"):]: v for k, v in result.history[-1].items()
               if k.startswith("eval/")}
    params = jax.device_get(parallel.host_local(result.state["params"]))
    reference = clap_eval.evaluate_params(params, cfg, source, tokenizer)
    return {"metrics": metrics, "reference": reference}


def controls_examples():
    from ldm_jax.data import synthetic
    return [synthetic.generate_example(2, i, "test", 16000, 3.0, controls=True)
            for i in range(3)]


def check_controls_eval(workdir: str) -> dict:
    """Scores of clips against their controls, one clip a batch shared among the hosts."""
    from ldm_jax import controls
    from ldm_jax.controls import evaluate as control_eval
    cfg = controls.FeatureConfig(sample_rate=16000, frame_rate=50)
    scores = control_eval.score_clips(controls_examples(), cfg, transform=lambda x: 0.5 * x,
                                      batch_size=1)
    return json.loads(json.dumps(scores))


def check_unguarded_evaluation(workdir: str) -> list:
    """An evaluation that reads a parameter sharded over both hosts without gathering it."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from ldm_jax import loop, parallel

    tx = optax.sgd(0.1)

    def init(rng):
        # Large enough to be FSDP-sharded.
        params = {"w": nn.LogicallyPartitioned(jax.random.normal(rng, (64, 64)), ("embed", "mlp"))}
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def step(state, batch, rng):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((batch["x"] @ p["w"]) ** 2))(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"])
        return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state}, {"loss": loss}

    task = loop.Task(name="toy", init=init, step=step, model_config={},
                     evaluate=lambda state: {"norm": float(np.linalg.norm(state["params"]["w"]))})
    batches = iter([{"x": np.ones((2, 64), np.float32)}] * 2)
    try:
        loop.train(task, batches, workdir=os.path.join(workdir, "toy"), num_steps=1,
                   mesh=parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}),
                   checkpoint_cfg={"every_steps": 0}, log_cfg={"progress": False})
    except Exception as e:  # noqa: BLE001 — the test looks at the error
        return [type(e).__name__, str(e)]
    return []


def controlnet_batches(rows=slice(None)):
    """Two global batches of 8 for the ControlNet (ROWS: this host's share)."""
    import numpy as np
    out = []
    for i in range(2):
        rng = np.random.default_rng(10 + i)
        mask = np.ones((8, 16), bool)
        mask[0, 8:] = False
        batch = {"latents": rng.normal(size=(8, 16, 8)).astype(np.float32) * mask[..., None],
                 "latents_mask": mask,
                 "context": rng.normal(size=(8, 6, 32)).astype(np.float32),
                 "context_mask": np.arange(6)[None] < rng.integers(1, 6, (8, 1)),
                 "pooled": rng.normal(size=(8, 16)).astype(np.float32),
                 "controls": rng.normal(size=(8, 16, 15)).astype(np.float32)}
        out.append({k: v[rows] for k, v in batch.items()})
    return out


def controlnet_run(workdir: str) -> dict:
    """Two ControlNet steps through the loop on an FSDP mesh over every device; returns the
    losses and the norm of the trained parameters (gathered)."""
    import jax
    import ml_collections
    import numpy as np

    from ldm_jax import config as config_lib
    from ldm_jax import parallel
    from ldm_jax.diffusion import controlnet, controlnet_train
    from ldm_jax.diffusion.unet import init_variables
    from ldm_jax.loop import train

    base_cfg = config_lib.get_config("ldm_tiny", [
        "model.latent_channels=8", "model.base_channels=16", "model.channel_mult=(1,2)",
        "model.attention_levels=(1,)", "model.num_heads=2", "model.norm_groups=8",
        "model.context_dim=32", "model.pooled_dim=16", "diffusion.num_train_timesteps=100"])
    cfg = controlnet_train.merged_config(ml_collections.ConfigDict({
        "model": {"encoder_channels": (8,)}, "masks": {},
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-3, "eps": 1e-2}}), base_cfg)
    unet = controlnet.base_unet(cfg)
    shapes = jax.eval_shape(lambda r: init_variables(unet, r)["params"], jax.random.key(0))
    rng = np.random.default_rng(1)
    base = jax.tree_util.tree_map(
        lambda a: (rng.normal(size=a.shape) * 0.1).astype(np.float32), shapes)
    task = controlnet_train.training_task(cfg, base)
    hosts, me = jax.process_count(), jax.process_index()
    share = 8 // hosts
    batches = iter(controlnet_batches(slice(me * share, (me + 1) * share)))
    result = train(task, batches, workdir=os.path.join(workdir, "controlnet"), num_steps=2,
                   mesh=parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}),
                   checkpoint_cfg={"every_steps": 0},
                   log_cfg={"progress": False, "every_steps": 1})
    params = parallel.host_local(result.state["params"])
    return {"losses": [r["train/loss"] for r in result.history if "train/loss" in r],
            "norm": float(np.sqrt(sum(np.sum(np.square(np.asarray(x), dtype=np.float64))
                                      for x in jax.tree_util.tree_leaves(params))))}


def ditto_run(workdir: str) -> dict:
    """DITTO on a toy generation, 4 candidates in batches of 2 shared among the hosts (each
    optimised on its own host's devices); returns every candidate's losses, gathered."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax import parallel
    from ldm_jax.controls import FeatureConfig
    from ldm_jax.diffusion import ditto, samplers
    from ldm_jax.diffusion import schedules as sch

    del workdir
    sr, hop, frames, dim = 16000, 320, 20, 4
    schedule = sch.make_schedule("cosine", 100)
    features = FeatureConfig(sample_rate=sr, frame_rate=50.0, n_fft=512, smooth_seconds=0.2)
    samples = (frames - 1) * hop

    def sample(params, x, context, steps, sampler, remat):
        return samplers.sample(sampler, lambda x, t: params * x, x, schedule, steps, "x0",
                               remat=remat)

    def decode(params, latents):
        env = jnp.repeat(jax.nn.softplus(params * latents), hop, axis=1)[:, :samples]
        t = jnp.arange(samples) / sr
        tones = jnp.sin(2 * np.pi * 220.0 * (1 + jnp.arange(dim))[None] * t[:, None])
        return 0.1 * jnp.einsum("btk,tk->bt", env, tones)

    problem = ditto.Problem(sample=sample, decode=decode, features=features, samples=samples)
    target = ditto.fit_frames(ditto.intensity(np.linspace(-30.0, -15.0, frames)),
                              features.num_frames(samples), frames)
    config = ditto.DittoConfig(iterations=4, sampler_steps=3, cfg_scale=1.0)
    noise = np.random.default_rng(0).standard_normal((4, frames, dim)).astype(np.float32)

    def batch(rows: range):
        out = ditto.optimise(problem, [target], noise[rows.start:rows.stop], jnp.float32(0.9),
                             jnp.float32(2.0), {}, config)
        return {"loss": out["loss"].tolist(), "initial": out["initial_loss"].tolist()}

    parts = parallel.map_batches(batch, 4, 2)
    return {"loss": [v for p in parts for v in p["loss"]],
            "initial": [v for p in parts for v in p["initial"]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)

    import jax

    from ldm_jax import parallel

    parallel.initialize_distributed()
    result = {"process_count": jax.process_count(), "gather": check_gather(),
              "leader": check_leader(args.workdir), "read": check_read(args.workdir),
              "chain": check_chain(args.workdir), "clap_eval": check_clap_eval(args.workdir),
              "controls_eval": check_controls_eval(args.workdir),
              "controlnet": controlnet_run(args.workdir), "ditto": ditto_run(args.workdir),
              "unguarded": check_unguarded_evaluation(args.workdir)}
    with open(os.path.join(args.out, f"host{jax.process_index()}.json"), "w") as f:
        json.dump(result, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
