"""Device mesh, partition rules, multi-host start and global batches.

One `jax.sharding.Mesh` with the named axes `data`, `fsdp` and `tensor` (the GSPMD recipe of
Xu et al. 2021, as used by big_vision and MaxText). Batches are sharded over (`data`, `fsdp`);
parameters are sharded over `fsdp` (ZeRO-3 style, Rajbhandari et al. 2020) on their largest
divisible axis, and over `tensor` where a rule says so. All rules live here, for every model.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated: sharding them saves nothing and costs collectives.
FSDP_MIN_SIZE = 2**12

# Path rules, first match wins: (regex over the "a/b/c" key path, spec over the array's axes).
# `None` means "use the default FSDP rule". Tensor-parallel splits follow Megatron (Shoeybi et al.
# 2019): column-parallel for the first projection of a pair, row-parallel for the second.
RULES: tuple[tuple[str, tuple | None], ...] = (
    (r".*(^|/)step$", ()),
    # Attention and MLP blocks of the transformer towers (CLAP) and U-Net attention.
    (r".*/(query|key|value|qkv)/kernel$", ("fsdp", "tensor")),
    (r".*/(out|proj_out)/kernel$", ("tensor", "fsdp")),
    (r".*/mlp/(fc1|wi)/kernel$", ("fsdp", "tensor")),
    (r".*/mlp/(fc2|wo)/kernel$", ("tensor", "fsdp")),
    # Token tables: the vocabulary over fsdp. Sharding their width instead makes GSPMD run the
    # whole text tower feature-sharded, with all-reduces of activations after every matmul.
    (r".*/(embedding|token_embedding)$", ("fsdp", "tensor")),
    # The diffusion timestep MLP works on [batch, features] vectors: with sharded kernels GSPMD
    # shards its features and all-gathers the batch instead; replicated, it stays data-parallel.
    (r".*(^|/)time_embed/fc[12]/kernel$", ()),
)


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


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shards the largest axis that the fsdp axis divides; small arrays stay replicated."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def _fit(spec: tuple, shape: tuple[int, ...], mesh: Mesh) -> P | None:
    """Aligns a rule's spec to the trailing axes of `shape`; None if a size does not divide."""
    if len(spec) > len(shape):
        return None
    full = [None] * (len(shape) - len(spec)) + list(spec)
    for size, axis in zip(shape, full):
        if axis is not None and size % mesh.shape[axis]:
            return None
    # Axes of size 1 in the mesh add nothing; drop them so specs print plainly.
    return P(*[a if a is None or mesh.shape[a] > 1 else None for a in full])


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of one array, from RULES then the default FSDP rule."""
    for pattern, spec in RULES:
        if re.fullmatch(pattern, path):
            if spec is None:
                break
            fitted = _fit(spec, shape, mesh)
            if fitted is not None:
                return fitted
            break
    return _fsdp_spec(shape, mesh.shape["fsdp"])


def tree_shardings(abstract_tree, mesh: Mesh):
    """NamedShardings for every leaf of an (abstract) pytree: params, optimiser state, EMA."""
    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(path_str(path), shape, mesh))
    return jax.tree_util.tree_map_with_path(one, abstract_tree)


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


def per_host_batch(global_batch_size: int, mesh: Mesh | None = None) -> int:
    """The share of a global batch that this host reads; errors if it does not divide evenly."""
    hosts = jax.process_count()
    shards = (mesh.shape["data"] * mesh.shape["fsdp"]) if mesh is not None else jax.device_count()
    if global_batch_size % shards or global_batch_size % hosts:
        raise MeshError(f"batch size {global_batch_size} must be a multiple of the {shards} "
                        f"batch shards (data x fsdp) and of the {hosts} hosts")
    return global_batch_size // hosts


def barrier(name: str):
    """Waits until every JAX process reaches the barrier `name` (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


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
