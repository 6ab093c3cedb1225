"""Device mesh, parameter sharding rules, and host-local batches → global arrays.

The mesh is described in the config as named axes, e.g. `(("data", -1), ("fsdp", 1))`; -1
takes the devices left over. The batch is split over every mesh axis (data parallel, and FSDP
is data parallel too); parameters are replicated, or, when the "fsdp" axis is larger than 1,
split over it along their largest dimension that divides evenly. Multi-slice runs (TPU slices
joined over the data-centre network) add `num_slices` along the "data" axis through
`mesh_utils.create_hybrid_device_mesh`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

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
  num_slices = int(mesh_config.num_slices)
  if num_slices < 1 or len(devices) % num_slices:
    raise ValueError(
      f"mesh.num_slices={num_slices} must be >= 1 and divide the {len(devices)} devices."
    )
  per_slice = mesh_shape(mesh_config.axes, len(devices) // num_slices)
  names = tuple(per_slice)
  if num_slices == 1:
    grid = mesh_utils.create_device_mesh(tuple(per_slice.values()), devices)
  else:
    if "data" not in per_slice:
      raise ValueError("a multi-slice mesh needs a 'data' axis to span the slices.")
    dcn = tuple(num_slices if name == "data" else 1 for name in names)
    # CPU and GPU devices have no slice_index: then each process stands for a slice.
    process_is_granule = not hasattr(devices[0], "slice_index")
    grid = mesh_utils.create_hybrid_device_mesh(
      tuple(per_slice.values()), dcn, devices, process_is_granule=process_is_granule
    )
  return Mesh(grid, names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def parameter_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Replicated, or split over "fsdp" along the largest dimension it divides."""
  fsdp = mesh.shape.get("fsdp", 1)
  if fsdp == 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return replicated(mesh)
  candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp == 0]
  if not candidates:
    return replicated(mesh)
  spec = [None] * len(shape)
  spec[candidates[0]] = "fsdp"
  return NamedSharding(mesh, PartitionSpec(*spec))


def tree_shardings(mesh: Mesh, abstract_tree) -> Any:
  """Shardings for a pytree of ShapeDtypeStructs (e.g. from `jax.eval_shape`)."""
  return jax.tree.map(lambda x: parameter_sharding(mesh, x.shape), abstract_tree)


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
