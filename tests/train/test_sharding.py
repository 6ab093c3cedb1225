"""The same global batch gives the same training on 1 device, 8 devices, and 2 hosts;
the mesh rules, and meshes on TPU tori."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from ml_collections import config_dict

from cmvt_jax import sharding
from configs import tpu_pod
from tests import helpers

# Training only: the end-of-run export and plots are tested elsewhere.
TRAIN_ONLY = ("--config.export.at_end=False", "--config.plots.at_end=False")
STEPS = ("--config.total_steps=3", "--config.checkpoint_every_steps=0", *TRAIN_ONLY)
TIGHT = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, micro_data_dir):
  workdir = tmp_path_factory.mktemp("one_device") / "run"
  helpers.run_main(workdir, *STEPS, devices=1, data_dir=micro_data_dir)
  return workdir


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory, micro_data_dir):
  workdir = tmp_path_factory.mktemp("eight_devices") / "run"
  helpers.run_main(workdir, *STEPS, devices=8, data_dir=micro_data_dir)
  return workdir


def assert_same_training(a, b, step=3):
  losses_a, losses_b = helpers.losses(a), helpers.losses(b)
  assert sorted(losses_a) == sorted(losses_b) == list(range(1, step + 1))
  np.testing.assert_allclose(
    [losses_a[s] for s in sorted(losses_a)], [losses_b[s] for s in sorted(losses_b)], **TIGHT
  )
  helpers.assert_trees_equal(
    helpers.load_state(a, step)["params"], helpers.load_state(b, step)["params"], **TIGHT
  )


@pytest.mark.slow
def test_eight_devices_match_one(one_device_run, eight_device_run):
  assert_same_training(one_device_run, eight_device_run)


@pytest.mark.slow
def test_eight_device_checkpoint_resumes_on_two(
  tmp_path, micro_data_dir, eight_device_run, one_device_run
):
  workdir = tmp_path / "run"
  shutil.copytree(eight_device_run, workdir)
  result = helpers.run_main(
    workdir, "--config.total_steps=5", *TRAIN_ONLY, devices=2, data_dir=micro_data_dir
  )
  assert "Resuming from the checkpoint at step 3" in result.stderr
  continued = tmp_path / "one_device_continued"
  shutil.copytree(one_device_run, continued)
  helpers.run_main(
    continued, "--config.total_steps=5", *TRAIN_ONLY, devices=1, data_dir=micro_data_dir
  )
  assert_same_training(workdir, continued, step=5)


# ----------------------------------------------------------------------------- mesh rules


def mesh_config(axes, num_slices=1):
  config = config_dict.ConfigDict()
  config.axes, config.num_slices = axes, num_slices
  return config


def test_mesh_shape_resolves_the_free_axis_and_refuses_impossible_shapes():
  assert sharding.mesh_shape((("data", -1), ("fsdp", 2)), 8) == {"data": 4, "fsdp": 2}
  with pytest.raises(ValueError, match=r"fixed axes multiply to 3, which does not divide 8"):
    sharding.mesh_shape((("data", -1), ("fsdp", 3)), 8)
  with pytest.raises(ValueError, match=r"has 4 positions but there are 8 devices"):
    sharding.mesh_shape((("data", 2), ("fsdp", 2)), 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape((("data", -1), ("fsdp", -1)), 8)


def test_parameters_split_over_fsdp_along_their_largest_divisible_dimension():
  mesh = sharding.create_mesh(mesh_config((("data", -1), ("fsdp", 1))))
  assert sharding.parameter_sharding(mesh, (512, 256)).spec == PartitionSpec()
  grid = np.array(jax.devices() * 2).reshape(1, 2)  # the spec rule only reads the axis sizes
  two = jax.sharding.Mesh(grid, ("data", "fsdp"))
  assert sharding.parameter_sharding(two, (300, 512)).spec == PartitionSpec(None, "fsdp")
  assert sharding.parameter_sharding(two, (513, 64)).spec == PartitionSpec(None, "fsdp")
  assert sharding.parameter_sharding(two, (64,)).spec == PartitionSpec()  # small: replicated


def test_a_scanned_stack_of_layers_is_never_split_along_its_layer_axis():
  grid = np.array(jax.devices() * 8).reshape(1, 8)
  eight = jax.sharding.Mesh(grid, ("data", "fsdp"))
  # The largest axis would be split, but in a stack it is the layer axis the loop slices.
  stack, plain = (2048, 64, 1024), (2048, 64)
  tree = {
    "Transformer": {
      "encoderblock": {"kernel": jax.ShapeDtypeStruct(stack, np.float32)},
      "bias": jax.ShapeDtypeStruct(plain, np.float32),
    }
  }
  found = sharding.tree_shardings(eight, tree)
  assert found["Transformer"]["encoderblock"]["kernel"].spec == PartitionSpec(None, None, "fsdp")
  assert found["Transformer"]["bias"].spec == PartitionSpec("fsdp", None)  # not a stack
  # 2048 layers of 256 entries: each layer is small, so the stack stays replicated.
  small = {"encoderblock": jax.ShapeDtypeStruct((2048, 16, 16), np.float32)}
  assert sharding.tree_shardings(eight, small)["encoderblock"].spec == PartitionSpec()


def test_batch_size_must_split_over_devices():
  grid = np.array(jax.devices() * 4).reshape(4, 1)
  mesh = jax.sharding.Mesh(grid, ("data", "fsdp"))
  with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by the 4 devices"):
    sharding.check_batch_size(6, mesh)


@dataclasses.dataclass(frozen=True)
class TorusChip:
  """What mesh_utils reads of a TPU device: a v5e chip at `coords` of its slice's torus."""

  id: int
  coords: tuple[int, int, int]
  slice_index: int
  process_index: int
  platform: str = "tpu"
  device_kind: str = "TPU v5 lite"
  core_on_chip: int = 0


def v5e_slices(side: int, num_slices: int) -> list[TorusChip]:
  """`num_slices` v5e slices of side × side chips, 2 × 2 chips per host (a v5e-256 is 16)."""
  chips = []
  for slice_index in range(num_slices):
    for y in range(side):
      for x in range(side):
        host = slice_index * (side // 2) ** 2 + (y // 2) * (side // 2) + x // 2
        chips.append(TorusChip(len(chips), (x, y, 0), slice_index, host))
  return chips


@pytest.mark.parametrize("num_slices", [1, 2])
def test_tpu_pod_mesh_builds_on_v5e_256_slices_with_fsdp_on_neighbouring_chips(num_slices):
  config = config_dict.ConfigDict()
  config.axes, config.num_slices = tpu_pod.get_config().mesh.axes, num_slices
  chips = v5e_slices(16, num_slices)
  grid = sharding.device_grid(config, chips)
  assert grid.shape == (32 * num_slices, 8)
  assert sorted(chip.id for chip in grid.flat) == list(range(len(chips)))
  for group in grid:  # one FSDP group: 8 chips in a line of one slice's torus
    assert len({chip.slice_index for chip in group}) == 1
    coords = np.array([chip.coords for chip in group])
    varying = [axis for axis in range(3) if len(set(coords[:, axis])) > 1]
    assert len(varying) == 1, coords
    line = sorted(coords[:, varying[0]])
    assert line == list(range(line[0], line[0] + 8)), coords
  # The data axis spans the slices (over DCN).
  assert {chip.slice_index for chip in grid[:, 0]} == set(range(num_slices))


def test_two_slices_in_one_cpu_process_is_a_clear_error():
  with pytest.raises(ValueError, match=r"mesh.num_slices=2, but these cpu devices belong to 1 "):
    sharding.device_grid(mesh_config((("data", -1), ("fsdp", 1)), num_slices=2), jax.devices() * 2)
