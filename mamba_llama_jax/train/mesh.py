"""Device mesh and the logical-axis → mesh-axis rules: one table for every parameter of every model.

Mesh axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data parallel too, but parameters and
optimizer state are sharded over it along their `embed` dimension and gathered per layer by XLA), `tensor`
(Megatron-style: heads, MLP width, vocabulary and the Mamba channel dimensions split). The batch is split over
(data, fsdp). A dimension that the mesh axes do not divide evenly stays replicated (tiny models, odd head
counts such as SmolLM2's 9), so the same rules work on any mesh.

The mesh uses `AxisType.Auto`: shardings are given for inputs and outputs of the jitted step and XLA (GSPMD)
propagates them through the model. Two things it cannot infer are said explicitly, and only while a context mesh
is set (`trainer.build_step` sets it while tracing its step; single-device use and inference see none):
`constrain_batch` keeps the hidden states between decoder layers split over the batch axes (else, with `embed`
sharded over `fsdp`, GSPMD reshards activations instead of gathering weights), and `batch_split_axes` tells the
kernel dispatcher to run Pallas kernels (custom calls, which GSPMD cannot split) per batch shard in `shard_map`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mamba_llama_jax.config import MeshConfig
from mamba_llama_jax.errors import TrainingError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Every logical axis name used by models/llama.py and models/mamba.py. None: replicated.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "ssm_proj": "tensor",
    "ssm_conv_ch": "tensor",
    "ssm_inner": "tensor",
    "ssm_xb": "tensor",
    "ssm_heads": "tensor",
    "ssm_state": None,
    "conv_width": None,
    "dt_rank": None,
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolves a -1 axis and checks that the mesh uses exactly the available devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise TrainingError(f"mesh {sizes}: {n_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise TrainingError(f"mesh (data, fsdp, tensor) = {tuple(sizes)} needs {math.prod(sizes)} devices, "
                            f"{n_devices} are available: change `mesh` in the recipe")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig | tuple[int, int, int] = MeshConfig(),
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all)."""
    devs = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(MeshConfig(*cfg) if isinstance(cfg, tuple) else cfg, len(devs))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devs)


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: jax.sharding.Mesh,
                    rules: dict[str, Any] = RULES) -> P:
    """The PartitionSpec of one array: each logical name mapped by `rules`, dropping mesh axes that do not divide
    the dimension or are already used by an earlier dimension."""
    if logical is None:
        return P()
    if len(logical) != len(shape):
        raise TrainingError(f"logical axes {tuple(logical)} do not match an array of shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        if name is not None and name not in rules:
            raise TrainingError(f"no sharding rule for logical axis {name!r}; add it to train.mesh.RULES")
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for a in axes:
            size = mesh.shape[a]
            if size == 1 or a in used:
                continue
            if dim % (math.prod(mesh.shape[k] for k in keep) * size) == 0:
                keep.append(a)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _logical_axes(var: Any) -> Sequence[str | None] | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: dict[str, Any] = RULES) -> nnx.State:
    """A NamedSharding for every variable of an `nnx.State`, from its logical-axis metadata (no metadata, or a
    non-array leaf: replicated). Same tree structure as `state`, so it can be passed to `jax.device_put`/`jit`."""
    def one(var: Any) -> Any:
        if isinstance(var, nnx.Variable):
            value = var.get_value()
            shape = getattr(value, "shape", ())
            return var.replace(NamedSharding(mesh, logical_to_spec(_logical_axes(var), shape, mesh, rules)))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: jax.sharding.Mesh, rules: dict[str, Any] = RULES) -> nnx.State:
    """`state` placed on the mesh according to its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def batch_split_axes(batch: int) -> tuple[str, ...] | None:
    """The context mesh's batch axes of size > 1 (manual ones, inside a `shard_map`, excluded) when together they
    split `batch` rows evenly; None when there is no context mesh, nothing to split, or an uneven batch (callers
    then leave the layout to GSPMD)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1 and types[a] != jax.sharding.AxisType.Manual)
    if not axes or batch % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def constrain_batch(x: jax.Array) -> jax.Array:
    """x (batch, ...) split over the batch axes of the context mesh and replicated over the rest; x itself when
    `batch_split_axes` gives none."""
    axes = batch_split_axes(x.shape[0])
    return x if axes is None else jax.lax.with_sharding_constraint(x, P(axes))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension split over (data, fsdp); everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """A host's rows of the global batch as global arrays sharded over (data, fsdp). On several hosts each
    process passes its own rows (the per-host shard of the pipeline); on one it is a plain device_put."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Joins a multi-host run (`jax.distributed.initialize`) before anything touches the devices; returns whether
    it did. Arguments default to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; with none of them,
    JAX detects the cluster itself (Cloud TPU pod slices, SLURM, Open MPI), so on a TPU pod every host runs the same
    command unchanged. CPU processes exchange collectives through gloo (the default CPU backend has none).

    After it, `jax.devices()` lists every host's devices (the mesh spans them all), `jax.process_index()` picks
    this host's shard of the data (`data.pipeline.build_dataset(shard_index=...)`), and `global_batch` assembles
    the hosts' rows into global arrays."""
    if jax.distributed.is_initialized():
        return False
    import os

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid)
    return True


def _env_int(name: str) -> int | None:
    import os

    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise TrainingError(f"{name} must be an integer, got {v!r}") from None
