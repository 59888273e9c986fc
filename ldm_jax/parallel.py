"""Device mesh, partition rules, multi-host start and coordination, global batches.

One `jax.sharding.Mesh` with the named axes `data`, `fsdp` and `tensor` (the GSPMD recipe of
Xu et al. 2021, as used by big_vision and MaxText). Batches are sharded over (`data`, `fsdp`);
parameters are sharded over `fsdp` (ZeRO-3 style, Rajbhandari et al. 2020) and `tensor` by the
logical names of their axes, which the models declare (`ldm_jax.axes.LOGICAL`); the rules that
map those names to mesh axes live here and name no model's parameters.

Several hosts (JAX processes) run the same program. A collective — a barrier, a gather, an orbax
checkpoint manager, a step over arrays that span hosts — must be reached by every host or by
none. Work outside training is shared by whole batches: batch k of a sequence goes to host
k mod N (`host_batches`, `map_batches`), so every batch is the one a single host would form and
results gathered in order (`gather_batches`) equal a single host's. Work that one host does
alone (building a dataset, writing a report) runs in `on_leader`, inside `leader_only`, which
turns any multi-host call made there into a `MultiHostError` naming it, on one host as on many:
such a call would wait forever for hosts that never come.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.axes import AXES, BATCH_AXES

# Arrays smaller than this are not split over fsdp: sharding them saves nothing and costs
# collectives.
FSDP_MIN_SIZE = 2**12

# Logical axis name (`ldm_jax.axes.LOGICAL`) -> the mesh axis that may split it (None: never).
# An array is split over `tensor` on every axis whose name maps there (Megatron, Shoeybi et al.
# 2019: a projection's heads/hidden columns, then the rows of the one after it), and over `fsdp`
# (ZeRO-3) on one axis whose name maps there and whose size the fsdp axis divides: a table's rows
# (`TABLE_ROWS`) if it has them, else the largest such axis. Splitting a token table's width
# instead would make GSPMD run the whole tower feature-sharded, all-reducing activations.
LOGICAL_RULES: dict[str, str | None] = {
    "embed": "fsdp", "context": "fsdp", "joint": "fsdp", "vocab": "fsdp",
    "conv_in": "fsdp", "conv_out": "fsdp", "codebook_entries": "fsdp", "cond_in": "fsdp",
    "heads": "tensor", "mlp": "tensor",
    # Token positions and kernel taps are short. A per-example conditioning vector's features
    # stay whole, or GSPMD splits them and gathers the batch of what they condition; where a
    # projection reads them (`cond_in`) its kernel is split on them and gathered instead.
    "position": None, "conv_width": None, "codebook_dim": None, "cond_embed": None,
    "classes": None,
}
TABLE_ROWS = ("vocab", "codebook_entries")


class ShardingError(ValueError):
    """An array's logical axis names do not describe it, or name an axis no rule covers."""


class MeshError(ValueError):
    """The mesh shape in the config does not fit the devices."""


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolves `mesh.{data,fsdp,tensor}` (one of them may be -1) against the device count."""
    sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
    if sizes.count(-1) > 1:
        raise MeshError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"{num_devices} devices do not divide into mesh axes of size {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise MeshError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                        f"but {num_devices} are present; set --config.mesh.data=-1")
    return tuple(sizes)


def make_mesh(mesh_cfg=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh from a config section (default: all data-parallel)."""
    if devices is None:
        require_all_hosts("a device mesh over every host's devices")
    devices = list(devices if devices is not None else jax.devices())
    mesh_cfg = mesh_cfg if mesh_cfg is not None else {"data": -1, "fsdp": 1, "tensor": 1}
    shape = mesh_shape(mesh_cfg, len(devices))
    if devices == list(jax.devices()):
        # Topology-aware device order (ICI rings on TPU, NVLink islands on GPU hosts).
        # Auto axes: GSPMD propagates shardings from the explicit in/out shardings of each step.
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                             devices=devices)
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def path_str(path) -> str:
    """`jax.tree_util` key path to "a/b/c"."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_for(names: Sequence[str | None], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of one array from the logical names of its axes (LOGICAL_RULES)."""
    if len(names) != len(shape):
        raise ShardingError(f"{len(names)} logical axis names {tuple(names)} for an array of "
                            f"shape {tuple(shape)}")
    for name in names:
        if name is not None and name not in LOGICAL_RULES:
            raise ShardingError(f"no sharding rule for logical axis {name!r}; add it to "
                                "ldm_jax.axes.LOGICAL and ldm_jax.parallel.LOGICAL_RULES")
    wanted = [None if n is None else LOGICAL_RULES[n] for n in names]
    spec: list[str | None] = [None] * len(shape)
    for i, axis in enumerate(wanted):
        if (axis not in (None, "fsdp") and axis not in spec and mesh.shape[axis] > 1
                and shape[i] % mesh.shape[axis] == 0):
            spec[i] = axis
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and math.prod(shape) >= FSDP_MIN_SIZE:
        free = [i for i, axis in enumerate(wanted)
                if axis == "fsdp" and spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: (names[i] in TABLE_ROWS, shape[i]))] = "fsdp"
    return P(*spec) if any(spec) else P()


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for every array of an (abstract) pytree: params, optimiser state, EMA.

    The tree holds its arrays in the `nn.LogicallyPartitioned` boxes that `model.init` returns
    (optax's and the trainers' tree maps keep them), and the result has the unboxed tree's
    structure. Arrays outside a box are replicated; one of `FSDP_MIN_SIZE` elements or more
    without names is an error, as a model parameter whose axes were never named would be
    silently copied to every device.
    """
    def one(path, leaf):
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, spec_for(leaf.names, tuple(leaf.value.shape), mesh))
        shape = tuple(getattr(leaf, "shape", ()))
        if math.prod(shape) >= FSDP_MIN_SIZE:
            raise ShardingError(f"{path_str(path)} {shape} has no logical axis names; create it "
                                "with nn.with_logical_partitioning (ldm_jax.nn.layers.named)")
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(
        one, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def memory_estimate(compiled) -> int | None:
    """XLA's static estimate of a compiled program's memory in bytes: arguments + outputs +
    temporaries, outputs that reuse a donated argument's buffer counted once; None where the
    backend gives none."""
    try:
        analysis = compiled.memory_analysis() if compiled is not None else None
    except Exception:  # noqa: BLE001 — backends without the analysis raise instead
        analysis = None
    if analysis is None:
        return None
    size = lambda field: int(getattr(analysis, field, 0) or 0)
    return (size("argument_size_in_bytes") + size("output_size_in_bytes")
            - size("alias_size_in_bytes") + size("temp_size_in_bytes"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, batch) -> dict:
    return jax.tree_util.tree_map(lambda x: batch_sharding(mesh, np.ndim(x)), batch)


def global_batch(mesh: Mesh, local_batch):
    """Per-host numpy batch -> global jax.Arrays sharded on the batch axes."""
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return jax.tree_util.tree_map(one, local_batch)


def bucket_rows(n: int, limit: int) -> int:
    """Rows a host batch of n is padded to: the next power of two, at most `limit` unless n is
    larger (so that few shapes compile)."""
    return min(max(limit, n), 1 << max(n - 1, 0).bit_length())


def per_host_batch(global_batch_size: int, mesh: Mesh | None = None) -> int:
    """The share of a global batch that this host reads; errors if it does not divide evenly."""
    hosts = jax.process_count()
    shards = (mesh.shape["data"] * mesh.shape["fsdp"]) if mesh is not None else jax.device_count()
    if global_batch_size % shards or global_batch_size % hosts:
        raise MeshError(f"batch size {global_batch_size} must be a multiple of the {shards} "
                        f"batch shards (data x fsdp) and of the {hosts} hosts")
    return global_batch_size // hosts


# ------------------------------------------------------------------------------ several hosts

class MultiHostError(RuntimeError):
    """A call that every host must reach was made where only some hosts run."""


class LeaderFailed(RuntimeError):
    """Work that process 0 did alone failed there; raised on the other hosts."""


# Names of the leader-only sections the calling code is in (innermost last).
_LEADER_ONLY: list[str] = []


def is_leader() -> bool:
    return jax.process_index() == 0


def require_all_hosts(what: str):
    """Raises MultiHostError if called inside a leader-only section: `what` (a barrier, a
    gather, a checkpoint manager) needs every host, and the others are not there."""
    if _LEADER_ONLY:
        raise MultiHostError(
            f"{_LEADER_ONLY[-1]} runs on process 0 only, but reached {what}, which every host "
            "must reach: run it on every host, or keep it to host code (trained models load "
            "with checkpoint.read_state)")


def _refusing(what: str, original: Callable, allowed: Callable | None = None) -> Callable:
    def refuse(*args, **kwargs):
        if allowed is not None and allowed(*args, **kwargs):
            return original(*args, **kwargs)
        named = f" ({args[0]})" if args and isinstance(args[0], str) else ""
        require_all_hosts(what + named)
        return original(*args, **kwargs)
    return refuse


@contextlib.contextmanager
def leader_only(name: str):
    """A section that one host runs while the others wait (`on_leader`).

    Inside it, the project's multi-host entry points (`barrier`, `gather_objects`,
    `host_local`, `make_mesh`, `checkpoint.Checkpointer`) and the synchronisation functions of
    JAX (`multihost_utils`) and orbax (`sync_global_processes`, used by every checkpoint
    manager) raise MultiHostError, also with one process, so tests on one host find what
    would hang on several. Orbax managers over this process alone stay allowed.
    """
    from jax.experimental import multihost_utils
    from orbax.checkpoint._src.multihost import multihost as orbax_multihost

    def own_process(*args, processes=None, **kwargs):
        return processes is not None and set(processes) == {jax.process_index()}

    saved = []
    if not _LEADER_ONLY:  # the outermost section patches, and restores on leaving
        for n in ("sync_global_devices", "process_allgather", "broadcast_one_to_all"):
            saved.append((multihost_utils, n, getattr(multihost_utils, n)))
            setattr(multihost_utils, n, _refusing(f"jax's {n}", saved[-1][2]))
        saved.append((orbax_multihost, "sync_global_processes",
                      orbax_multihost.sync_global_processes))
        orbax_multihost.sync_global_processes = _refusing(
            "an orbax barrier", saved[-1][2], own_process)
    _LEADER_ONLY.append(name)
    try:
        yield
    finally:
        _LEADER_ONLY.pop()
        for module, n, fn in saved:
            setattr(module, n, fn)


def barrier(name: str):
    """Waits until every JAX process reaches the barrier `name` (nothing with one process)."""
    require_all_hosts(f"the barrier {name!r}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def gather_objects(value) -> list:
    """Every host's `value` (any picklable object), in process order, on every host."""
    require_all_hosts("a gather across hosts")
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(everything[i, :int(sizes[i, 0])].tobytes())
            for i in range(jax.process_count())]


def broadcast_from_leader(value):
    """Process 0's `value` (picklable) on every host: one decision for all of them."""
    return gather_objects(value if is_leader() else None)[0]


def any_host(flag: bool) -> bool:
    """Whether `flag` is true on any host."""
    require_all_hosts("a vote across hosts")
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def on_leader(name: str, fn: Callable[[], object], *, share: bool = False):
    """Runs `fn` on process 0 alone (in `leader_only(name)`) while the others wait.

    Args:
      name: what runs, for messages ("stage data").
      fn: the work; it may make no multi-host call.
      share: also return fn's result (picklable) on the other hosts.

    Returns:
      fn's result on process 0, and on the others with `share` (else None).

    Raises:
      On process 0, whatever fn raised; on the others LeaderFailed with its message (or
      KeyboardInterrupt if process 0 was interrupted), so no host waits for a failed one.
    """
    result, error, failure = None, None, None
    if is_leader():
        try:
            with leader_only(name):
                result = fn()
        except KeyboardInterrupt as e:
            error, failure = e, ("interrupt", "")
        except Exception as e:  # noqa: BLE001 — re-raised below, after the others learn of it
            error = e
            failure = ("error", (str(e).strip().splitlines() or [type(e).__name__])[0])
    failure, shared = broadcast_from_leader((failure, result if share else None))
    if error is not None:
        raise error
    if failure is not None:
        if failure[0] == "interrupt":
            raise KeyboardInterrupt
        raise LeaderFailed(f"{name} failed on process 0: {failure[1]}")
    return result if is_leader() else shared


def host_batches(num_batches: int) -> range:
    """The batches of a sequence that this host handles: k = process_index (mod process_count)."""
    return range(jax.process_index(), int(num_batches), jax.process_count())


def gather_batches(local: Sequence) -> list:
    """Per-batch results of `host_batches` from every host, in batch order, on every host.

    Args:
      local: this host's results, one per batch of `host_batches(n)`, in that order.

    Returns:
      [result of batch 0, batch 1, ...].
    """
    parts = gather_objects(list(local))
    count = len(parts)
    total = sum(len(p) for p in parts)
    return [parts[k % count][k // count] for k in range(total)]


def map_batches(fn: Callable[[range], object], n: int, batch_size: int, *,
                desc: str | None = None) -> list:
    """`[fn(rows) for rows in batches of range(n)]`, the batches shared among the hosts.

    Each host calls `fn` on its batches (`host_batches`); the results are gathered in order on
    every host, so the list equals a single host's. `fn` must make no multi-host call. With
    `desc`, process 0 shows a progress bar over its batches.
    """
    from tqdm.auto import tqdm

    require_all_hosts("work shared among the hosts")  # before the work, not after it
    size = max(int(batch_size), 1)
    mine = host_batches(-(-n // size))
    bar = tqdm(mine, desc=desc, leave=False, disable=desc is None or not is_leader()
               or len(mine) < 2)
    return gather_batches([fn(range(k * size, min((k + 1) * size, n))) for k in bar])


def host_local(tree):
    """Arrays this host can compute with: leaves that span other hosts become numpy copies of
    their global value (replicated ones without communication). Identity on one host.

    Call it on every host (a sharded leaf is all-gathered), before host code reads device
    arrays: evaluation, media and generation run on each host's own devices.
    """
    if jax.process_count() == 1:
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    spans = [isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves]
    sharded = [i for i, s in enumerate(spans) if s and not leaves[i].is_fully_replicated]
    if any(spans):
        require_all_hosts("a gather of arrays that span hosts")
    out = [np.asarray(x.addressable_data(0)) if s else x for x, s in zip(leaves, spans)]
    if sharded:
        from jax.experimental import multihost_utils
        gathered = multihost_utils.process_allgather([leaves[i] for i in sharded], tiled=True)
        for i, value in zip(sharded, gathered):
            out[i] = np.asarray(value)
    return jax.tree_util.tree_unflatten(treedef, out)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Starts multi-host JAX when there is more than one host; returns whether it did.

    SLURM jobs with several tasks and TPU pods that export their worker list are detected here
    and JAX fills in the addresses; LDM_JAX_DISTRIBUTED=auto asks for the same where nothing in
    the environment says so (a TPU VM slice made by `gcloud compute tpus tpu-vm create`, found
    through its metadata server). Elsewhere pass an explicit coordinator (`host:port`) or set
    LDM_JAX_COORDINATOR / LDM_JAX_NUM_PROCESSES / LDM_JAX_PROCESS_ID.
    """
    coordinator = coordinator or os.environ.get("LDM_JAX_COORDINATOR")
    if num_processes is None and os.environ.get("LDM_JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["LDM_JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("LDM_JAX_PROCESS_ID"):
        process_id = int(os.environ["LDM_JAX_PROCESS_ID"])
    if coordinator:
        # Only affects CPU devices; lets two local processes act as two hosts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return True
    auto = ("SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1) or \
        "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ or \
        os.environ.get("LDM_JAX_DISTRIBUTED") == "auto"
    if auto:
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
        return True
    return False
