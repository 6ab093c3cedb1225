"""Device mesh, parameter sharding rules, and host-local batches → global arrays.

The mesh is described in the config as named axes, e.g. `(("data", -1), ("fsdp", 1))`; -1
takes the devices left over. The batch is split over every mesh axis (data parallel, and FSDP
is data parallel too); parameters are replicated, or, when the "fsdp" axis is larger than 1,
split over it along their largest dimension that divides evenly. Multi-slice runs (TPU slices
joined over the data-centre network) add `num_slices` along the "data" axis through
`mesh_utils.create_hybrid_device_mesh`.

The multi-host helpers below are the only places where processes exchange host values
(votes, counts, a shared-folder probe); every process must call them at the same point.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax._src import hardware_utils
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from cmvt_jax import files
from cmvt_jax.models import frame_encoder

# Parameters smaller than this stay replicated: splitting them saves nothing and costs
# a collective each step.
FSDP_MIN_SIZE = 2**14


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
  """Resolves one -1 entry so the axis sizes multiply to `num_devices`."""
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axes must have distinct names; got {names}.")
  if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise ValueError(
      f"mesh axis sizes must be positive, with at most one -1; got {dict(zip(names, sizes))}."
    )
  known = math.prod(size for size in sizes if size != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"mesh {dict(zip(names, sizes))} cannot cover {num_devices} devices: the fixed axes "
        f"multiply to {known}, which does not divide {num_devices}. Change config.mesh.axes."
      )
    sizes[sizes.index(-1)] = num_devices // known
  elif known != num_devices:
    raise ValueError(
      f"mesh {dict(zip(names, sizes))} has {known} positions but there are {num_devices} "
      "devices; make the sizes multiply to the device count or use -1 for one axis."
    )
  return dict(zip(names, sizes))


def create_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  """The mesh of `config.mesh` over all devices (of every process).

  `mesh_config.axes`: `((name, size), ...)`; `mesh_config.num_slices`: slices joined over
  DCN, multiplied into the "data" axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_grid(mesh_config, devices), tuple(name for name, _ in mesh_config.axes))


def device_grid(mesh_config, devices: Sequence[Any]) -> np.ndarray:
  """`devices` arranged as `config.mesh` (all slices): an array of axis sizes × slices.

  On a TPU the order follows the torus (mesh_utils): the last axis ("fsdp") gets the
  chips that are closest, and it stays inside one slice's ICI.
  """
  num_slices = int(mesh_config.num_slices)
  if num_slices < 1 or len(devices) % num_slices:
    raise ValueError(
      f"mesh.num_slices={num_slices} must be >= 1 and divide the {len(devices)} devices."
    )
  per_slice = mesh_shape(mesh_config.axes, len(devices) // num_slices)
  # A logical axis whose size is no product of whole torus axes (fsdp 8 on a v5e-256's
  # 16×16) takes part of one physical axis; mesh_utils splits only when it must, so the
  # axes that do fit whole keep their full ring bandwidth.
  if num_slices == 1:
    return mesh_utils.create_device_mesh(
      tuple(per_slice.values()), devices, allow_split_physical_axes=True
    )
  if "data" not in per_slice:
    raise ValueError("a multi-slice mesh needs a 'data' axis to span the slices.")
  dcn = tuple(num_slices if name == "data" else 1 for name in per_slice)
  # CPU and GPU devices have no slice_index: then each process stands for a slice.
  process_is_granule = not hasattr(devices[0], "slice_index")
  processes = len({device.process_index for device in devices})
  if process_is_granule and processes != num_slices:
    raise ValueError(
      f"mesh.num_slices={num_slices}, but these {devices[0].platform} devices belong to "
      f"{processes} process(es): without TPU slices, each process stands for one slice. "
      f"Run {num_slices} processes, or set --config.mesh.num_slices={processes}."
    )
  return mesh_utils.create_hybrid_device_mesh(
    tuple(per_slice.values()),
    dcn,
    devices,
    process_is_granule=process_is_granule,
    allow_split_physical_axes=True,
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def parameter_sharding(mesh: Mesh, shape: Sequence[int], *, stacked: bool = False) -> NamedSharding:
  """Replicated, or split over "fsdp" along the largest dimension it divides.

  `stacked`: the leaf holds one slice per layer on its leading axis (a scanned stack of
  blocks); that axis is never split (the layer loop slices it: split, every step would gather
  the whole stack), and the size rule counts one layer.
  """
  fsdp = mesh.shape.get("fsdp", 1)
  layer_shape = shape[1:] if stacked else shape
  if fsdp == 1 or math.prod(layer_shape) < FSDP_MIN_SIZE:
    return replicated(mesh)
  first = 1 if stacked else 0
  candidates = [d for d in np.argsort(shape)[::-1] if d >= first and shape[d] % fsdp == 0]
  if not candidates:
    return replicated(mesh)
  spec = [None] * len(shape)
  spec[candidates[0]] = "fsdp"
  return NamedSharding(mesh, PartitionSpec(*spec))


def tree_shardings(mesh: Mesh, abstract_tree) -> Any:
  """`parameter_sharding` of every leaf of a pytree of ShapeDtypeStructs (`jax.eval_shape`):
  parameters and optimiser moments split by the FSDP rule, small leaves and scalars
  replicated; leaves under a scanned stack of ViT blocks keep their layer axis whole."""

  def leaf_sharding(path, x):
    stacked = any(getattr(key, "key", None) == frame_encoder.SCANNED_BLOCKS for key in path)
    return parameter_sharding(mesh, x.shape, stacked=stacked)

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree)


def traced_over(mesh: Mesh, fn):
  """`fn` traced with `mesh` as the abstract mesh (jit it): the models' row constraints
  (`frame_encoder.split_over_mesh`, inside scanned layers) then split rows like the batch."""

  @functools.wraps(fn)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  """The global batch must split evenly over devices and processes."""
  devices, processes = mesh.devices.size, jax.process_count()
  unit = math.lcm(devices, processes)
  if global_batch % unit:
    raise ValueError(
      f"batch_size={global_batch} must be divisible by the {devices} devices of the mesh "
      f"{dict(mesh.shape)} and the {processes} processes; e.g. "
      f"--config.batch_size={unit * math.ceil(global_batch / unit)}."
    )


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch (this process's rows) → global arrays split over the mesh.

  Every process passes its own `[B / process_count, ...]` rows; the result has the global
  leading dimension B.
  """
  sharding = batch_sharding(mesh)
  count = jax.process_count()

  def to_global(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * count,) + x.shape[1:])

  return {name: to_global(value) for name, value in host_batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree`'s arrays whole on every device of `mesh` (a collective when they are sharded)."""
  return _replicator(mesh)(tree)


@functools.cache
def _replicator(mesh: Mesh):
  # One jitted function per mesh: a new jit (of a new lambda) per call compiled again for
  # every batch of an evaluation.
  return jax.jit(lambda tree: tree, out_shardings=replicated(mesh))


def local_rows(arrays: dict[str, jax.Array]) -> dict[str, np.ndarray]:
  """The rows of batch-sharded global arrays that live on this process's devices, in
  global order (nothing crosses hosts)."""

  def rows(x):
    shards = sorted(x.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data) for shard in shards])

  return {key: rows(value) for key, value in arrays.items()}


# ----------------------------------------------------------------------------- multi-host


def process_share(items: Sequence) -> list:
  """This process's share of a list every process sees: items p, p + P, p + 2P, ..."""
  return list(items[jax.process_index() :: jax.process_count()])


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on at least one."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def from_process_zero(values: Sequence[int]) -> np.ndarray:
  """Process 0's int `values` on every process: for decisions read from files that only
  process 0 is sure to see."""
  values = np.asarray(values, np.int32)
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.broadcast_one_to_all(values))


def gather(values: Sequence[float], dtype=np.int32) -> np.ndarray:
  """`[process_count, len(values)]` of `dtype`: every process's values, in process order.

  Floats travel as float32 (JAX's default precision)."""
  values = np.asarray(values, dtype)
  if jax.process_count() == 1:
    return values[None]
  return np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), -1)


def folder_is_shared(folder: epath.PathLike) -> bool:
  """Whether every process sees the same `folder`: process 0 writes a token the others read."""
  folder = epath.Path(folder)
  token = int(multihost_utils.broadcast_one_to_all(np.int32(time.time_ns() % 2**31)))
  probe = folder / f".cmvt_shared_probe_{token}"
  if jax.process_index() == 0:
    folder.mkdir(parents=True, exist_ok=True)
    files.write_text(probe, str(token), kind="shared-probe")
  multihost_utils.sync_global_devices("cmvt_jax: shared-folder probe written")
  sees = probe.exists() and probe.read_text() == str(token)
  every = not any_process(not sees)
  multihost_utils.sync_global_devices("cmvt_jax: shared-folder probe read")
  if jax.process_index() == 0:
    files.remove(probe, kind="shared-probe-remove")
  return every


# Environment variables that mean a scheduler started one process per host: then
# `jax.distributed.initialize()` finds the coordinator, process count and index by itself.
_CLUSTER_MARKERS = {
  "SLURM_NTASKS": "SLURM",
  "OMPI_COMM_WORLD_SIZE": "Open MPI",
  "TPU_WORKER_HOSTNAMES": "TPU VM",
  "MEGASCALE_NUM_SLICES": "TPU multi-slice",
}


def choose_platforms() -> None:
  """Leaves the TPU backend out on a machine without TPU chips; call it before any computation.

  With libtpu installed (requirements-tpu.txt, which `--mode compile` needs), jax tries the
  TPU backend first on every machine: on one without chips that costs ~2 s and prints a page
  of initialisation errors. When the user chose no platforms (JAX_PLATFORMS) and the PCI bus
  has no TPU, jax gets CUDA then the CPU where a CUDA plugin and an NVIDIA device are present,
  else the CPU (the TPU compiler stays usable through `jax.experimental.topologies`).
  """
  if jax.config.jax_platforms or importlib.util.find_spec("libtpu") is None:
    return
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
    return
  has_cuda = any(epath.Path("/dev").glob("nvidia[0-9]*")) and any(
    importlib.util.find_spec(plugin) for plugin in ("jax_cuda12_plugin", "jax_cuda13_plugin")
  )
  jax.config.update("jax_platforms", "cuda,cpu" if has_cuda else "cpu")


def initialize_distributed(
  distributed_config,
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins the multi-host runtime when this is one process of several; call it before any
  computation. The three arguments go together (localhost runs); without them a SLURM,
  Open MPI or Cloud TPU VM cluster is detected. `distributed_config`: `config.distributed`.
  """
  # Collectives between CPU processes (localhost rehearsals) go through gloo; the setting
  # is ignored by GPU and TPU backends.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeouts = dict(
    initialization_timeout=distributed_config.initialization_timeout_seconds,
    heartbeat_timeout_seconds=distributed_config.heartbeat_timeout_seconds,
  )
  explicit = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in explicit):
    if any(value is None for value in explicit):
      raise ValueError(
        f"--coordinator_address, --num_processes and --process_id go together; got {explicit}."
      )
    jax.distributed.initialize(*explicit, **timeouts)
    return
  detected = [name for var, name in _CLUSTER_MARKERS.items() if _more_than_one(var)]
  if not detected and hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
    # A Cloud TPU VM (`gcloud ... tpu-vm ssh --worker=all`) sets no environment variable;
    # JAX finds the slice's workers in the VM's metadata (the test reads the PCI bus only).
    detected = ["Cloud TPU VM"]
  if detected:
    logging.info("Detected a %s cluster; joining it.", detected[0])
    jax.distributed.initialize(**timeouts)


def _more_than_one(variable: str) -> bool:
  value = os.environ.get(variable, "")
  if variable == "TPU_WORKER_HOSTNAMES":
    return "," in value
  return value.isdigit() and int(value) > 1
