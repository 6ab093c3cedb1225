"""Restoring checkpoints: parameters only for evaluation, and which checkpoints a model may read.

A checkpoint is refused only when a parameter's shape differs: a key added after the
checkpoint was written, or a key that sets no shape (dtype, remat, dropout, windows), is no
reason to refuse it.
"""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ml_collections import config_dict

from cmvt_jax import checkpoints
from cmvt_jax import run as run_lib
from tests import helpers
from tests.evaluate.conftest import LATEST_STEP
from tests.evaluate.conftest import micro_config


def test_parameters_only_restore_reads_no_optimiser_state(workdir, run, monkeypatch):
  targets = []
  original = ocp.CheckpointManager.restore

  def recording_restore(self, step, args=None):
    targets.append({name: getattr(item, "item", None) for name, item in args.items()})
    return original(self, step, args=args)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", recording_restore)
  trained = run.restore_params()

  [state_target] = [target["state"] for target in targets if "state" in target]
  assert list(state_target) == ["params"] and list(state_target["params"]) == ["model"]
  assert trained.step == LATEST_STEP
  saved = helpers.load_state(workdir, LATEST_STEP)
  assert "opt_state" in saved  # the checkpoint has moments; they were not asked for
  helpers.assert_trees_equal(jax.device_get(trained.params), saved["params"]["model"])
  stats = json.loads((workdir / "checkpoints" / str(LATEST_STEP) / "meta" / "metadata").read_text())
  assert trained.stats.to_dict() == stats["stats"]


def test_a_given_step_is_restored(run):
  assert run.restore_params(step=5).step == 5
  with pytest.raises(ValueError, match=r"No complete checkpoint at step 7 .* \[5, 20\]"):
    run.restore_params(step=7)


@pytest.fixture
def old_workdir(tmp_path, workdir):
  """A copy of the workdir whose checkpoints' configs lack `model.remat` and
  `model.video.vit.dropout_rate`, as if written before those keys existed."""
  copy = tmp_path / "old"
  shutil.copytree(workdir, copy)
  for step in (5, LATEST_STEP):
    path = copy / "checkpoints" / str(step) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    del meta["config"]["model"]["remat"]
    del meta["config"]["model"]["video"]["vit"]["dropout_rate"]
    path.write_text(json.dumps(meta))
  return copy


def test_a_checkpoint_older_than_a_key_is_read_and_resumed(old_workdir, micro_data_dir):
  # Keys that set no shape may differ too.
  config = micro_config(
    micro_data_dir,
    **{"model.dtype": "bfloat16", "model.remat": True, "model.video.temporal.windows": (1,)},
  )
  run = run_lib.Run.create(config, old_workdir)
  assert run.restore_params().step == LATEST_STEP
  manager = checkpoints.manager(old_workdir, max_to_keep=5)
  try:
    restored = checkpoints.restore_latest(manager, run.abstract_state, check=run.check_checkpoint)
  finally:
    manager.close()
  assert restored.step == LATEST_STEP
  assert int(restored.state.step) == LATEST_STEP


@pytest.mark.parametrize(
  "overrides, named",
  [
    ({"input.n_mels": 64}, "input.n_mels: checkpoint 32, now 64"),
    ({"model.video.vit.width": 48}, "model.video.vit.width: checkpoint 32, now 48"),
  ],
)
def test_a_model_of_another_shape_is_refused_with_the_keys_named(
  workdir, micro_data_dir, overrides, named
):
  config = micro_config(micro_data_dir, **overrides)
  run = run_lib.Run.create(config, workdir)
  with pytest.raises(run_lib.ConfigMismatchError) as error:
    run.restore_params()
  message = str(error.value)
  assert named in message
  assert "parameters differ, e.g." in message and "now (" in message
  assert "a new --workdir" in message


def test_compatibility_is_decided_by_shapes_not_by_keys():
  shapes = {"['w']": (4, 8)}
  config = {"model": {"width": 8, "dtype": "float32", "added_later": True}}
  saved = {"model": {"width": 8, "dtype": "bfloat16"}}
  run_lib.check_compatible(saved, shapes, _config(config), dict(shapes), "w")
  with pytest.raises(run_lib.ConfigMismatchError, match=r"model.width: checkpoint 4, now 8"):
    run_lib.check_compatible(
      {"model": {"width": 4}}, {"['w']": (4, 4)}, _config(config), shapes, "w"
    )


def test_a_checkpoint_of_the_other_vit_block_layout_names_the_key_to_set():
  unrolled = {f"['Transformer']['encoderblock_{i}']['kernel']": (8, 8) for i in range(2)}
  scanned = {"['Transformer']['encoderblock']['kernel']": (2, 8, 8)}
  config = _config({"model": {"width": 8}})
  saved = {"model": {"width": 8}}  # written before model.video.vit.scan_layers existed
  with pytest.raises(run_lib.ConfigMismatchError, match=r"scan_layers=False"):
    run_lib.check_compatible(saved, unrolled, config, scanned, "w")
  with pytest.raises(run_lib.ConfigMismatchError, match=r"blocks are scanned: set "):
    run_lib.check_compatible(saved, scanned, config, unrolled, "w")


def _config(values):
  return config_dict.ConfigDict(values)


def test_parameter_shapes_of_tree_metadata_equal_those_of_the_arrays(workdir, run):
  reader = checkpoints.reader(workdir)
  try:
    saved = reader.item_metadata(LATEST_STEP)["state"]
  finally:
    reader.close()
  assert run_lib.parameter_shapes(saved["params"]) == run_lib.parameter_shapes(
    run.abstract_state.params
  )
  assert np.prod(list(run_lib.parameter_shapes(saved["params"]).values())[0]) > 0
