"""The one training loop that every model uses.

A model hands the loop a `Task`: a state initialiser and a pure
`state, batch, rng -> state, metrics` step. The loop owns everything else: the mesh and
shardings (abstract state first, then a jitted init with `out_shardings`, as in flax's lm1b
example), resuming (the workdir's own checkpoint, then an explicit resume path, then a
params-only init path, else scratch: big_vision's order), checkpoints that include the
data-iterator position, metrics with a non-finite guard, TensorBoard scalars and media, a progress
bar, evaluation and preemption. It knows nothing of audio.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ldm_jax import parallel, paths
from ldm_jax.checkpoint import Checkpointer, CheckpointError
from ldm_jax.config import ConfigError

METRICS_FILE = "metrics.jsonl"
# How often logs of a remote workdir are copied up (and at the end of a run): objects are
# rewritten whole, and an object store limits how often one object may be written.
SYNC_SECONDS = 30.0


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What a model gives the loop.

    Attributes:
      name: the stage name, used in messages and TensorBoard tags.
      init: `rng -> state`; the state is a pytree (a dict holding at least `step` and `params`)
        whose parameters, and whatever mirrors them (optimiser moments, EMA), are in the
        `nn.LogicallyPartitioned` boxes `model.init` gives them: their logical axis names place
        them on the mesh (`parallel.tree_shardings`). The loop holds the state unboxed.
      step: pure `state, batch, rng -> (state, metrics)`; metrics a flat dict of scalars.
        The step folds `rng` with `state["step"]` itself, so a resumed run draws the same keys.
      model_config: the config section that fixes parameter shapes; checkpoints must match it.
        A model's config dataclass rather than a dict lets a checkpoint written before a field
        was added (with its default) still match (`checkpoint.Checkpointer`).
      prepare: host-side `numpy batch -> numpy batch` (field selection, tokenisation).
      evaluate: optional `state -> {name: float}` run every `eval_every` steps and at the end.
      media: optional `state -> {tag: ("audio", wave [T], sample_rate) | ("image", uint8 HWC)}`
        (process 0's items are written).
      Both are called on every host with the global state, whose arrays may span hosts: they
      read them through `parallel.host_local` and share their work with `parallel.map_batches`.
      loss_key: the metric that must stay finite.
      grads, apply: the step split for gradient accumulation (`accumulating_step`):
        `grads(state, batch, rng, (i, k)) -> (grads, metrics)` on the rows i::k of a batch k
        times as large, with the randomness those rows get in it, and
        `apply(state, grads, metrics) -> (state, metrics)` from the mean gradients. A task
        without them trains with `grad_accum_steps=1` only.
      warm_start: optional `abstract state -> {key: partial tree}`: host values (numpy) for
        subtrees of a state started from scratch, e.g. a trained model's parameters that a
        ControlNet copies and keeps frozen. A partial tree names only the subtrees it sets;
        every host returns the whole values and each places the shards its devices hold.
    """

    name: str
    init: Callable[[jax.Array], Any]
    step: Callable[[Any, dict, jax.Array], tuple[Any, dict]]
    model_config: Any
    prepare: Callable[[dict], dict] = lambda batch: batch
    evaluate: Callable[[Any], dict] | None = None
    media: Callable[[Any], dict] | None = None
    loss_key: str = "loss"
    grads: Callable | None = None
    apply: Callable | None = None
    warm_start: Callable[[Any], dict] | None = None


def micro_rows(x: jax.Array, i, k: int) -> jax.Array:
    """Rows i, i + k, i + 2k, ... of X (micro-batch i of k; `i` may be traced)."""
    return jax.lax.dynamic_index_in_dim(x.reshape((x.shape[0] // k, k) + x.shape[1:]), i,
                                        axis=1, keepdims=False)


def accumulating_step(task: Task, k: int) -> Callable:
    """`task.step` as k micro-batches of interleaved rows (i::k), one after another in a
    `lax.scan`: their gradients and metrics are averaged and one update is applied. It equals
    the whole batch's step (up to float summation order) with about 1/k of its activation
    memory. k = 1 is `task.step` itself.

    Raises:
      ConfigError: the task cannot split its step (`Task.grads` / `Task.apply`).
    """
    if k == 1:
        return task.step
    if task.grads is None or task.apply is None:
        raise ConfigError(f"{task.name} cannot split a step into micro-batches "
                         f"(train.grad_accum_steps={k}); use grad_accum_steps=1")

    def step(state, batch, rng):
        rows = {int(x.shape[0]) for x in jax.tree_util.tree_leaves(batch)}
        if any(n % k for n in rows):
            raise ConfigError(f"{task.name}: a batch of {sorted(rows)} rows does not split into "
                             f"train.grad_accum_steps={k} micro-batches")
        micro = jax.tree_util.tree_map(
            lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), batch)
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda: task.grads(state, first, rng, (0, k)))
        zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), shapes)

        def body(total, xs):
            i, part = xs
            out = task.grads(state, part, rng, (i, k))
            return jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), total,
                                          out), None

        (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
        grads = jax.tree_util.tree_map(lambda g, a: (g / k).astype(a.dtype), grads, shapes[0])
        metrics = jax.tree_util.tree_map(lambda m: m / k, metrics)
        return task.apply(state, grads, metrics)

    return step


def ema_update(ema, params, decay):
    """One step of an exponential moving average of parameter trees:
    `decay * ema + (1 - decay) * params` per leaf (the EMA every trainer keeps)."""
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


@dataclasses.dataclass
class TrainResult:
    state: Any
    step: int
    history: list[dict]
    preempted: bool = False


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (a second SIGINT kills)."""

    def __init__(self):
        self.raised = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.raised is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def any_host(self) -> bool:
        return parallel.any_host(self.raised is not None)


class _Writer:
    """TensorBoard and JSON-lines metrics, written by process 0 only.

    In a remote workdir (gs://), where files cannot be appended to, the metrics file is kept in
    memory and rewritten whole, and TensorBoard writes into a local directory that is copied up
    (`paths.SyncedDir`): both every SYNC_SECONDS and at `close`.
    """

    def __init__(self, logdir: str | None, metrics_path: str):
        self.metrics_path = metrics_path
        self.tb = None
        self._logs = None
        self._metrics_text = None  # the whole metrics file of a remote workdir
        self._remote = paths.is_remote(metrics_path) or bool(logdir and paths.is_remote(logdir))
        self._synced = time.monotonic()
        if jax.process_index() != 0:
            return
        if paths.is_remote(metrics_path):
            self._metrics_text = paths.read_text(metrics_path) if paths.exists(metrics_path) \
                else ""
        if logdir:
            from tensorboardX import SummaryWriter
            self._logs = paths.SyncedDir(logdir)
            # TensorBoard names its file by the second and the host only: a resumed run started
            # within the same second would overwrite the first run's events.
            self.tb = SummaryWriter(self._logs.local, flush_secs=30,
                                    filename_suffix=f".{os.getpid()}.{os.urandom(4).hex()}")

    def _sync(self):
        if not self._remote or time.monotonic() - self._synced < SYNC_SECONDS:
            return
        self._synced = time.monotonic()
        if self._metrics_text is not None:
            paths.write_text(self.metrics_path, self._metrics_text)
        if self.tb is not None:
            self.tb.flush()
            self._logs.sync()

    def scalars(self, step: int, values: dict):
        if jax.process_index() != 0:
            return
        line = json.dumps({"step": step, **values}) + "\n"
        if self._metrics_text is not None:
            self._metrics_text += line
        else:
            with open(self.metrics_path, "a") as f:
                f.write(line)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        self._sync()

    def media(self, step: int, items: dict):
        if self.tb is None:
            return
        for tag, item in items.items():
            if item[0] == "audio":
                wave = np.clip(np.asarray(item[1], np.float32).reshape(-1), -1, 1)
                self.tb.add_audio(tag, wave, step, sample_rate=int(item[2]))
            elif item[0] == "image":
                self.tb.add_image(tag, np.asarray(item[1]), step, dataformats="HWC")
        self._sync()

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self._metrics_text is not None:
            paths.write_text(self.metrics_path, self._metrics_text)
        if self._logs is not None:
            self._logs.close()


def read_history(workdir: str) -> list[dict]:
    """The logged metrics of a stage, for reports and tests."""
    path = os.path.join(workdir, METRICS_FILE)
    if not paths.exists(path):
        return []
    return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def _abstract_with_shardings(abstract, shardings):
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _host_code(task: Task, what: str, state):
    """`task.evaluate(state)` or `task.media(state)`, with a clear error where it reads arrays
    that span hosts without gathering them."""
    try:
        return getattr(task, what)(state)
    except RuntimeError as e:
        if "non-addressable" not in str(e):
            raise
        raise parallel.MultiHostError(
            f"{task.name}: its {what} function read device arrays that span several hosts; "
            "read the state through parallel.host_local and share work with "
            "parallel.map_batches") from e


def _place(value, sharding) -> jax.Array:
    """A host's whole value of a (possibly multi-host) array placed as SHARDING says."""
    return jax.make_array_from_callback(np.shape(value), sharding,
                                        lambda i: np.asarray(value)[i])


def _place_subtrees(tree, values, shardings):
    """TREE with the subtrees that VALUES names replaced by its values (placed)."""
    if not isinstance(values, Mapping):
        if np.shape(values) != tuple(tree.shape):
            raise CheckpointError(f"a warm-start value of shape {np.shape(values)} replaces an "
                                  f"array of shape {tuple(tree.shape)}")
        return _place(np.asarray(values, tree.dtype), shardings)
    unknown = [k for k in values if k not in tree]
    if unknown:
        raise CheckpointError(f"warm-start values for {', '.join(map(str, unknown))}, which the "
                              "state does not have")
    return {k: _place_subtrees(tree[k], values[k], shardings[k]) if k in values else tree[k]
            for k in tree}


def initial_state(task: Task, rng, mesh, checkpointer: Checkpointer, *, resume_from: str = "",
                  init_from: str = "", data_iterator=None):
    """Resume order: own checkpoint, explicit resume path, params-only init path, scratch."""
    boxed = jax.eval_shape(task.init, rng)
    shardings = parallel.tree_shardings(boxed, mesh)
    abstract = nn.meta.unbox(boxed)
    target = _abstract_with_shardings(abstract, shardings)
    if checkpointer.latest_step() is not None:
        return checkpointer.restore(target, data_iterator), shardings, "resumed"
    if resume_from:
        other = Checkpointer(resume_from, model_config=task.model_config)
        return other.restore(target, data_iterator), shardings, f"resumed from {resume_from}"
    state = jax.jit(lambda r: nn.meta.unbox(task.init(r)), out_shardings=shardings)(rng)
    if task.warm_start is not None:
        state = dict(state)
        for key, values in task.warm_start(abstract).items():
            state[key] = _place_subtrees(state[key], values, shardings[key])
    if init_from:
        other = Checkpointer(init_from, model_config=task.model_config,
                             this_host_only=True)
        try:
            other.check_config()
            loaded = other.read()
        finally:
            other.close()
        if "params" not in loaded:
            raise CheckpointError(f"{init_from} holds no params to initialise from")
        state = dict(state)
        # Every host read the whole value; each places the shards its devices hold.
        state["params"] = jax.tree_util.tree_map(_place, loaded["params"], shardings["params"])
        return state, shardings, f"params from {init_from}"
    return state, shardings, "scratch"


def train(task: Task, data_iterator: Iterator[dict], *, workdir: str, num_steps: int,
          seed: int = 0, mesh=None, checkpoint_cfg=None, log_cfg=None, eval_every: int = 0,
          logdir: str | None = None, grad_accum_steps: int = 1) -> TrainResult:
    """Runs (or resumes) training of one stage until `num_steps`.

    Args:
      task: the model's Task.
      data_iterator: per-host numpy batches (a grain iterator: its position is checkpointed).
      workdir: the stage directory; checkpoints go to `workdir/checkpoints`.
      num_steps: the total number of steps of the run (a resumed run continues to it).
      seed: base seed of the init and step keys.
      mesh: a jax Mesh; all devices data-parallel when None.
      checkpoint_cfg: `every_steps`, `keep`, `resume_from`, `init_from` (experiments/common.py).
      log_cfg: `every_steps`, `audio_every_steps`, `progress`.
      eval_every: evaluation period in steps (0: only at the end).
      logdir: TensorBoard directory (none when empty).
      grad_accum_steps: micro-batches per step (`accumulating_step`).

    Returns:
      TrainResult with the final state, step and the logged history.

    Raises:
      NonFiniteLoss: the loss became NaN/Inf; nothing after the last good checkpoint is saved.
    """
    mesh = mesh if mesh is not None else parallel.make_mesh()
    step_fn = accumulating_step(task, int(grad_accum_steps))
    ck = dict(every_steps=500, keep=2, resume_from="", init_from="")
    ck.update(dict(checkpoint_cfg or {}))
    lg = dict(every_steps=50, audio_every_steps=0, progress=True)
    lg.update(dict(log_cfg or {}))
    paths.makedirs(workdir)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=ck["keep"],
                                model_config=task.model_config)
    init_rng, step_rng = jax.random.split(jax.random.key(seed))
    state, shardings, origin = initial_state(
        task, init_rng, mesh, checkpointer, resume_from=ck["resume_from"],
        init_from=ck["init_from"], data_iterator=data_iterator)
    step = int(jax.device_get(state["step"]))
    logging.info("%s: %s at step %d of %d", task.name, origin, step, num_steps)
    writer = _Writer(logdir, os.path.join(workdir, METRICS_FILE))
    history, sums, count, last_saved = [], {}, 0, checkpointer.latest_step()
    pending = None
    # One compiled step for the run: the state's shardings, and every batch leaf split on its
    # leading (batch) axis over the batch axes (a sharding given for the whole batch subtree).
    jitted = jax.jit(step_fn, donate_argnums=(0,),
                     in_shardings=(shardings, parallel.batch_sharding(mesh),
                                   parallel.replicated(mesh)),
                     out_shardings=(shardings, parallel.replicated(mesh)))
    bar = tqdm(total=num_steps, initial=step, desc=task.name, dynamic_ncols=True,
               disable=not lg["progress"] or jax.process_index() != 0)
    t_last, steps_since = time.perf_counter(), 0

    def settle(item):
        """Fetches one step's metrics and stops the run if the loss is not finite."""
        nonlocal sums, count
        at, metrics = item
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(metrics.get(task.loss_key, 0.0)):
            good = checkpointer.latest_step()
            where = f"the last good checkpoint is step {good} in {checkpointer.directory}" \
                if good is not None else "no checkpoint was written"
            raise NonFiniteLoss(f"{task.name}: {task.loss_key} became "
                                f"{metrics[task.loss_key]} at step {at}; stopped, {where}")
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1

    def save(at):
        nonlocal last_saved
        if last_saved != at:
            checkpointer.save(at, state, data_iterator)
            last_saved = at

    preempted = False
    try:
        with _StopSignal() as stop:
            while step < num_steps:
                host_batch = task.prepare(next(data_iterator))
                batch = parallel.global_batch(mesh, host_batch)
                # Tracing under the mesh lets models pin activations with logical constraints.
                # Only the step sees it: evaluation and media run on each host's own devices.
                with jax.set_mesh(mesh):
                    state, metrics = jitted(state, batch, step_rng)
                step += 1
                if pending is not None:
                    settle(pending)  # the previous step's metrics: no stall on this one
                pending = (step, metrics)
                bar.update(1)
                steps_since += 1
                log_now = step % lg["every_steps"] == 0 or step == num_steps
                ckpt_now = ck["every_steps"] and step % ck["every_steps"] == 0
                if log_now or ckpt_now:
                    settle(pending)
                    pending = None
                if log_now:
                    now = time.perf_counter()
                    row = {f"train/{k}": v / max(count, 1) for k, v in sums.items()}
                    row["train/steps_per_sec"] = steps_since / max(now - t_last, 1e-9)
                    sums, count, t_last, steps_since = {}, 0, now, 0
                    if eval_every and task.evaluate and step % eval_every == 0 \
                            and step != num_steps:
                        row.update({f"eval/{k}": v for k, v in
                                    _host_code(task, "evaluate", state).items()})
                    writer.scalars(step, row)
                    history.append({"step": step, **row})
                    bar.set_postfix(loss=f"{row.get('train/' + task.loss_key, float('nan')):.4g}")
                if lg["audio_every_steps"] and task.media and \
                        step % lg["audio_every_steps"] == 0:
                    writer.media(step, _host_code(task, "media", state))
                if ckpt_now:
                    save(step)
                if (log_now or jax.process_count() == 1) and stop.any_host():
                    # On a host that got no signal itself, a peer's signal stopped the run.
                    logging.warning("%s: %s received, saving step %d", task.name,
                                    stop.raised or "another host's stop signal", step)
                    preempted = True
                    break
            if pending is not None:
                settle(pending)
            save(step)
            if not preempted and task.evaluate is not None:
                row = {f"eval/{k}": v for k, v in
                       _host_code(task, "evaluate", state).items()}
                writer.scalars(step, row)
                history.append({"step": step, **row})
            if not preempted and task.media is not None and lg["audio_every_steps"]:
                writer.media(step, _host_code(task, "media", state))
    finally:
        bar.close()
        writer.close()
        checkpointer.close()
    return TrainResult(state=state, step=step, history=history, preempted=preempted)
