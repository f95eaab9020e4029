"""Device mesh and the one table that says how everything is sharded on it.

The model names the axes of its parameters and activations *logically* (`embed`, `mlp`,
`heads`, `activation_batch`, ...; see `flax_d2v.modeling`). `LOGICAL_AXIS_RULES` below maps
those names to the mesh axes `data`, `fsdp` and `tensor` (MaxText / big_vision style), and it is
the only place in the project where sharding is declared:

- params are sharded along `fsdp` on their `embed` / `conv_dim` axes (ZeRO-3 style: each device
  holds 1/fsdp of every large matrix; XLA all-gathers them for the matmuls and reduce-scatters
  the gradients), and along `tensor` on `mlp` / `heads` when a tensor axis is given;
- the optimizer state and data2vec's EMA teacher take the shardings of the params they mirror;
- the batch is split along its first axis over (`data`, `fsdp`), which together are the
  data-parallel degree.

One device is a mesh of one (every axis size 1), so the same jitted step runs everywhere. A
dimension that a mesh axis does not divide is replicated over that axis rather than refused
(e.g. a 32-symbol `lm_head` on 3 devices), and `describe` says which.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flax_d2v.errors import D2VError

PyTree = Any
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axes (None: replicated). Order matters only for duplicates: first wins.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", "tensor"),
    ("activation_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("conv_dim", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", None),
    ("conv_width", None),
    ("layers", None),
)


def parse_mesh(spec: str | None, num_devices: int | None = None) -> dict[str, int]:
    """`"data=2,fsdp=4"` -> {"data": 2, "fsdp": 4, "tensor": 1}; one `-1` takes the devices left.

    No spec means pure data parallelism over all devices.
    """
    n = jax.device_count() if num_devices is None else num_devices
    sizes = {a: 1 for a in MESH_AXES}
    if not spec:
        sizes["data"] = n
        return sizes
    fill = None
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise D2VError(f"--mesh: cannot read {part!r}; expected e.g. data=2,fsdp=4 with axes {list(MESH_AXES)}")
        size = int(value)
        if size == -1:
            if fill is not None:
                raise D2VError("--mesh: only one axis may be -1")
            fill = name
        elif size < 1:
            raise D2VError(f"--mesh: axis {name} has size {size}")
        else:
            sizes[name] = size
    known = math.prod(s for a, s in sizes.items() if a != fill)
    if fill is not None:
        if n % known:
            raise D2VError(f"--mesh {spec}: {n} devices are not divisible by {known}")
        sizes[fill] = n // known
    if math.prod(sizes.values()) != n:
        raise D2VError(f"--mesh {spec}: axes multiply to {math.prod(sizes.values())} but there are {n} devices")
    return sizes


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor) over all (global) devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: XLA propagates shardings from the in/out shardings and the logical constraints.
    # make_mesh orders devices so that inner axes ride the fastest links (ICI / NVLink).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _divisible(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with mesh axes that do not divide their dimension dropped (replicated)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = tuple(a for a in names if mesh.shape[a] > 1)
        while kept and dim % math.prod(mesh.shape[a] for a in kept):
            kept = kept[:-1]
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def logical_to_mesh(
    logical: PyTree, shapes: PyTree, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
) -> PyTree:
    """NamedShardings for a tree of logical `PartitionSpec`s and the matching tree of shapes."""
    mesh_specs = nn.logical_to_mesh(logical, rules)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, _divisible(s, x.shape, mesh)), mesh_specs, shapes, is_leaf=_is_spec
    )


def opt_state_logical_axes(tx: optax.GradientTransformation, opt_shapes: PyTree, params_axes: PyTree) -> PyTree:
    """Logical axes of the optimizer state: a moment takes its param's axes, counters are replicated.

    A state leaf mirrors a param when the tail of its key path is that param's path (optax keeps
    `mu`/`nu` as trees shaped like the params, with `MaskedNode`s where `multi_transform`
    masks a group out); anything else (step counts) is replicated.
    """
    del tx  # the layout is read from the state's own paths, which works through masked groups
    by_path = {
        tuple(str(k.key) for k in path): spec
        for path, spec in jax.tree_util.tree_flatten_with_path(params_axes, is_leaf=_is_spec)[0]
    }
    longest = max((len(p) for p in by_path), default=0)

    def spec_of(path, leaf):
        keys = [str(k.key) if isinstance(k, jax.tree_util.DictKey) else None for k in path]
        for n in range(min(longest, len(keys)), 0, -1):
            tail = keys[-n:]
            if None not in tail and tuple(tail) in by_path:
                spec = by_path[tuple(tail)]
                return spec if len(spec) <= len(leaf.shape) else PartitionSpec()
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_of, opt_shapes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of the batch (its slice along the example axis).

    On one process that is the whole batch; with several, each process passes the rows it read
    (`global rows / process_count`, in process order) and JAX assembles the global array.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def bytes_per_device(tree: PyTree) -> dict[str, int]:
    """Bytes each device holds of the arrays in `tree`, measured from their shardings."""
    total: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        if not isinstance(x, jax.Array):
            continue
        for shard in x.addressable_shards:
            key = str(shard.device)
            total[key] = total.get(key, 0) + shard.data.size * shard.data.dtype.itemsize
    return total


def describe(mesh: Mesh, tree_shardings: PyTree, shapes: PyTree) -> str:
    """One line: the mesh and how many parameters are sharded vs replicated."""
    sharded = replicated_n = 0
    for s, x in zip(jax.tree.leaves(tree_shardings), jax.tree.leaves(shapes), strict=True):
        n = math.prod(x.shape)
        if any(p is not None for p in s.spec):
            sharded += n
        else:
            replicated_n += n
    axes = ",".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
    return (
        f"mesh {axes} ({mesh.size} devices, {jax.process_count()} processes): "
        f"{sharded:,} param values sharded, {replicated_n:,} replicated"
    )


# Google's PCI vendor id and the device ids of TPU chips (v3, v4, v5p, v5e, v6e, TPU7x), as JAX's own
# `hardware_utils` lists them: a TPU VM is recognised from sysfs, with no metadata-server round trip.
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
PCI_DEVICES = "/sys/bus/pci/devices"


def tpu_chips(pci_devices: str = PCI_DEVICES) -> int:
    """TPU chips attached to this machine (0 off a TPU VM)."""
    import glob

    count = 0
    for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
        try:
            with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
                count += f.read().strip() == GOOGLE_PCI_VENDOR and g.read().strip() in TPU_PCI_DEVICES
        except OSError:
            continue
    return count


def detect_cluster(environ: Mapping[str, str] | None = None, pci_devices: str = PCI_DEVICES) -> str | None:
    """What `jax.distributed.initialize()` with no arguments will find here, in words, or None.

    Detected (the environment those platforms set; JAX's own cluster classes then read the rest):
    - a Cloud TPU VM (TPU chips on PCI): JAX asks the metadata server for the slice's workers, so every
      host of a pod slice (v4-32: 4 hosts) runs the same command with no flags;
    - TPUs on GKE: `TPU_WORKER_HOSTNAMES` (or `TPU_PROCESS_ADDRESSES`) listing several hosts;
    - Multislice: `MEGASCALE_COORDINATOR_ADDRESS`;
    - SLURM: `srun` with more than one task (`SLURM_JOB_ID`, `SLURM_NTASKS` > 1, `SLURM_STEP_NODELIST`,
      `SLURM_PROCID`, `SLURM_LOCALID`);
    - Open MPI: `mpirun` with more than one rank (`OMPI_MCA_orte_hnp_uri`, `OMPI_COMM_WORLD_SIZE` > 1).
    Anything else (GPU hosts started by hand, Kubernetes without the TPU variables) needs
    `--coordinator HOST:PORT --num-processes N --process-id I`.
    """
    env = os.environ if environ is None else environ
    hosts = [h for h in (env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or "").split(",") if h]
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return f"TPU Multislice (coordinator {env['MEGASCALE_COORDINATOR_ADDRESS']})"
    if len(hosts) > 1:
        return f"TPU slice on GKE ({len(hosts)} hosts in TPU_WORKER_HOSTNAMES)"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _count(env.get("SLURM_NTASKS")) > 1:
        return f"SLURM job {env['SLURM_JOB_ID']} ({env['SLURM_NTASKS']} tasks)"
    if "OMPI_MCA_orte_hnp_uri" in env and _count(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return f"Open MPI job ({env['OMPI_COMM_WORLD_SIZE']} ranks)"
    if env.get("TPU_SKIP_MDS_QUERY") is None and tpu_chips(pci_devices) > 0:
        return f"Cloud TPU VM ({tpu_chips(pci_devices)} chips here; the slice's hosts from the metadata server)"
    return None


def _count(value: str | None) -> int:
    try:
        return int(value or 1)
    except ValueError:
        return 1


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
    pci_devices: str = PCI_DEVICES,
) -> bool:
    """`jax.distributed.initialize` when the run spans several processes; True if it did.

    Explicit `--coordinator HOST:PORT --num-processes N --process-id I` always initialise. With none of
    them, `detect_cluster` decides: on a Cloud TPU VM, a GKE TPU slice, Multislice, a multi-task SLURM
    step or a multi-rank Open MPI job, `jax.distributed.initialize()` runs with no arguments and JAX's
    own cluster detection finds the coordinator; one line names what was found. A single process on one
    machine is left alone. Must run before anything touches devices.
    """
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given):
        if not all(given):
            raise D2VError("--coordinator, --num-processes and --process-id go together (give all three)")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        return True
    found = detect_cluster(environ, pci_devices)
    if found is None:
        return False
    jax.distributed.initialize()
    print(
        f"jax.distributed: {found}: process {jax.process_index()} of {jax.process_count()}",
        file=sys.stderr,
        flush=True,
    )
    return True
