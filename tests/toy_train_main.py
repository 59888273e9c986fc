"""A toy regression trainer run as its own process by the multi-host and preemption tests.

It drives the real pieces end to end — `parallel.initialize_distributed` (LDM_JAX_COORDINATOR /
LDM_JAX_NUM_PROCESSES / LDM_JAX_PROCESS_ID), the grain pipeline's per-host shard, `loop.train`
with its signal handling and orbax checkpoints — around a linear model small enough that a run
takes seconds on CPU. Each process writes `OUT/host{index}.json` (final step, steps run in this
launch, whether a signal stopped it, the example ids it read) and `OUT/host{index}.npz` (final
params), and keeps `OUT/progress{index}` at the number of batches read so far, so a test can
time a signal or a kill against the run. The functions under "launching" start such processes
(one, or several as the hosts of one cluster) and collect what they wrote.

    python tests/toy_train_main.py --workdir W --out O --steps 12 [--sleep 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import types

DIM = 16
NUM_EXAMPLES = 48
GLOBAL_BATCH = 8


def make_source(num_examples: int = NUM_EXAMPLES) -> list[dict]:
    """Random-access examples `{x: [DIM], y: [1], id: int}` of a fixed linear map."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((num_examples, DIM)).astype(np.float32)
    y = (x @ rng.standard_normal((DIM, 1))).astype(np.float32)
    return [{"x": x[i], "y": y[i], "id": np.int32(i)} for i in range(num_examples)]


def make_iterator(batch_size: int, seed: int = 0):
    """The project's grain pipeline over the toy source; the shard comes from jax's process."""
    from ldm_jax.data import pipeline

    data_cfg = types.SimpleNamespace(shuffle_seed=seed, crop_seconds=0.0, sample_rate=1.0,
                                     channels=1, worker_count=0, worker_buffer_size=1)
    # `x` is the "time-major" field: kept whole (crop_seconds=0), so it arrives as [B, DIM, 1].
    return pipeline.make_iterator(make_source(), data_cfg, batch_size=batch_size, train=True,
                                  fields=("x", "y", "id"), crop_key="x", rate=1.0)


def make_task(*, lr: float = 0.1, poison_at: int | None = None, sleep: float = 0.0,
              seen: list | None = None, progress_file: str | None = None):
    """A `loop.Task` fitting the linear map with Adam.

    Args:
      lr: Adam learning rate.
      poison_at: the step whose loss is replaced by NaN (None: never).
      sleep: seconds of host work per batch, so a signal lands mid-run.
      seen: list that receives the example ids of every batch this host reads.
      progress_file: file rewritten with the number of batches read so far.

    Returns:
      The Task.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from ldm_jax import loop

    tx = optax.adam(lr)

    def init(rng):
        params = {"w": jax.random.normal(rng, (DIM, 1)) * 0.1, "b": jnp.zeros((1,))}
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def step(state, batch, rng):
        rng = jax.random.fold_in(rng, state["step"])
        noise = 0.01 * jax.random.normal(rng, batch["y"].shape)

        def loss_fn(p):
            return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"] - noise) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        if poison_at is not None:
            loss = jnp.where(state["step"] + 1 == poison_at, jnp.nan, loss)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, {"loss": loss}

    read = [0]

    def prepare(batch):
        if seen is not None:
            seen.extend(int(i) for i in batch["id"])
        read[0] += 1
        if progress_file:
            with open(progress_file + ".tmp", "w") as f:
                f.write(str(read[0]))
            os.replace(progress_file + ".tmp", progress_file)
        if sleep:
            time.sleep(sleep)
        return {"x": np.asarray(batch["x"], np.float32)[..., 0],
                "y": np.asarray(batch["y"], np.float32)}

    return loop.Task(name="toy", init=init, step=step, model_config={"dim": DIM},
                     prepare=prepare)


# ------------------------------------------------------------------- launching (from tests)

SCRIPT = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(SCRIPT))
# Variables that would make a child join some other job's JAX cluster.
FOREIGN_ENV = ("LDM_JAX_", "SLURM_", "TPU_WORKER_", "MEGASCALE_", "JAX_COORDINATOR")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int = 2, **extra: str) -> dict:
    """A clean CPU-only environment with `devices` simulated devices per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p),
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(workdir, out, steps: int, *, hosts: int = 1, devices: int = 2,
          **flags) -> list[subprocess.Popen]:
    """Starts the toy trainer as `hosts` processes of one JAX cluster (a loopback coordinator).

    Args:
      workdir: the shared stage directory.
      out: directory for results, progress files and each process's log (`log{index}.txt`).
      steps: total steps of the run.
      hosts: number of processes; more than one start jax.distributed through the
        LDM_JAX_* variables that `parallel.initialize_distributed` reads.
      devices: simulated CPU devices per process.
      **flags: further command-line flags (`sleep=0.1` -> `--sleep 0.1`).

    Returns:
      The started processes, by process index.
    """
    argv = [sys.executable, SCRIPT, "--workdir", str(workdir), "--out", str(out),
            "--steps", str(steps)]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return start_cluster(argv, out, hosts=hosts, devices=devices)


def start_cluster(argv: list[str], out, *, hosts: int, devices: int = 2
                  ) -> list[subprocess.Popen]:
    """Starts ARGV as `hosts` processes of one JAX cluster on a loopback coordinator, each
    logging to `OUT/log{index}.txt`."""
    os.makedirs(out, exist_ok=True)
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for index in range(hosts):
        extra = {} if hosts == 1 else {"LDM_JAX_COORDINATOR": coordinator,
                                       "LDM_JAX_NUM_PROCESSES": str(hosts),
                                       "LDM_JAX_PROCESS_ID": str(index)}
        with open(os.path.join(out, f"log{index}.txt"), "w") as log:
            procs.append(subprocess.Popen(argv, env=child_env(devices, **extra), cwd=REPO,
                                          stdout=log, stderr=subprocess.STDOUT))
    return procs


def logs(out, count: int, tail: int = 4000) -> str:
    """The end of every process's log, for failure messages."""
    parts = []
    for index in range(count):
        path = os.path.join(out, f"log{index}.txt")
        text = open(path).read()[-tail:] if os.path.exists(path) else "(no log)"
        parts.append(f"--- process {index} ---\n{text}")
    return "\n".join(parts)


def wait(procs: list[subprocess.Popen], timeout: float = 180.0,
         grace: float = 30.0) -> list[int]:
    """Waits for every process; kills the rest when one fails or the time is up.

    A process of a cluster whose peer died would otherwise wait for it until JAX's own
    (minutes-long) timeouts.

    Returns:
      The exit codes (negative: killed by that signal).
    """
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    return [p.wait() for p in procs]


def finish(procs: list[subprocess.Popen], out, timeout: float = 180.0):
    """Waits and raises AssertionError with every log unless all processes exit with 0."""
    codes = wait(procs, timeout)
    if any(codes):
        raise AssertionError(f"exit codes {codes}\n{logs(out, len(procs))}")


def progress(out, index: int = 0) -> int:
    """Batches read so far by process `index` (0 before the first)."""
    try:
        with open(os.path.join(out, f"progress{index}")) as f:
            return int(f.read() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def wait_for_progress(procs: list[subprocess.Popen], out, count: int, index: int = 0,
                      timeout: float = 120.0):
    """Blocks until process `index` has read `count` batches; fails if a process exits first."""
    deadline = time.monotonic() + timeout
    while progress(out, index) < count:
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            wait(procs, timeout=1.0)
            raise AssertionError(f"toy trainer never read {count} batches\n"
                                 f"{logs(out, len(procs))}")
        time.sleep(0.02)


def result(out, index: int = 0) -> tuple[dict, dict]:
    """(summary, params) written by process `index`."""
    import numpy as np

    with open(os.path.join(out, f"host{index}.json")) as f:
        summary = json.load(f)
    with np.load(os.path.join(out, f"host{index}.npz")) as z:
        params = {k: z[k] for k in z.files}
    return summary, params


# ------------------------------------------------------------------------------ the process

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="directory for results and progress")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per batch")
    parser.add_argument("--ckpt-every", type=int, default=3, help="0: only when stopped")
    parser.add_argument("--log-every", type=int, default=2)
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from ldm_jax import loop, parallel

    parallel.initialize_distributed()
    index = jax.process_index()
    os.makedirs(args.out, exist_ok=True)
    mesh = parallel.make_mesh()
    seen: list[int] = []
    task = make_task(sleep=args.sleep, seen=seen,
                     progress_file=os.path.join(args.out, f"progress{index}"))
    batch_size = parallel.per_host_batch(GLOBAL_BATCH, mesh)
    iterator = make_iterator(batch_size)
    result = loop.train(task, iterator, workdir=args.workdir, num_steps=args.steps, mesh=mesh,
                        checkpoint_cfg={"every_steps": args.ckpt_every, "keep": 3},
                        log_cfg={"every_steps": args.log_every, "progress": False})
    # Replicated or not, gather the global value so every host writes the full params.
    gathered = multihost_utils.process_allgather(result.state["params"], tiled=True)
    params = jax.tree_util.tree_map(np.asarray, gathered)
    np.savez(os.path.join(args.out, f"host{index}.npz"), **params)
    summary = {"step": result.step, "steps_run": len(seen) // batch_size,
               "preempted": result.preempted, "process_index": index,
               "process_count": jax.process_count(), "device_count": jax.device_count(),
               "ids": seen}
    with open(os.path.join(args.out, f"host{index}.json"), "w") as f:
        json.dump(summary, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
