"""A NaN batch stops training with a message naming the step and the checkpoint to resume
from (or, when asked, is skipped and counted); a temperature at its bound stays finite."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmvt_jax import losses
from cmvt_jax import train
from cmvt_jax.data import pipeline
from configs import micro
from tests import helpers

POISONED_STEP = 3


class Poison:
  """Puts NaN frames into batch number `step` (a grain map after batching; one process)."""

  def __init__(self, step):
    self._step, self._count = step, 0

  def __call__(self, batch):
    self._count += 1
    if self._count == self._step:
      batch = {**batch, "video": np.full_like(batch["video"], np.nan)}
    return batch


@pytest.fixture
def poisoned_data(monkeypatch):
  original = pipeline.mixture_train_dataset
  monkeypatch.setattr(
    pipeline,
    "mixture_train_dataset",
    lambda *args, **kwargs: original(*args, **kwargs).map(Poison(POISONED_STEP)),
  )


def micro_config(data_dir, **overrides):
  config = micro.get_config()
  config.dataset.data_dir = str(data_dir)
  config.checkpoint_every_steps = 2
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.slow
def test_nan_batch_stops_training_and_names_the_step_and_checkpoint(
  tmp_path, micro_data_dir, poisoned_data
):
  workdir = tmp_path / "run"
  with pytest.raises(
    train.NonFiniteLossError,
    match=rf"at step {POISONED_STEP}; the update was not applied\. Resume "
    rf"from the checkpoint at step {POISONED_STEP - 1}",
  ):
    train.train_and_evaluate(micro_config(micro_data_dir), str(workdir))
  assert helpers.complete_steps(workdir) == [POISONED_STEP - 1]
  params = helpers.load_state(workdir, POISONED_STEP - 1)["params"]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_nan_batch_is_skipped_and_counted_when_asked(tmp_path, micro_data_dir, poisoned_data):
  workdir = tmp_path / "run"
  state = train.train_and_evaluate(
    micro_config(micro_data_dir, skip_nonfinite_batches=True), str(workdir)
  )
  assert int(state.skipped_batches) == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  lines = {line["step"]: line for line in helpers.train_lines(workdir)}
  assert lines[POISONED_STEP]["loss"] == "nan"
  assert lines[POISONED_STEP]["skipped_batches"] == 1
  assert lines[POISONED_STEP - 1]["skipped_batches"] == 0
  assert math.isfinite(lines[max(lines)]["loss"])


def test_temperature_at_its_bound_stays_finite():
  loss = losses.ContrastiveLoss(
    temperature=losses.Temperature(initial=0.1, learnable=True, minimum=0.01, maximum=1.0)
  )
  z = jax.random.normal(jax.random.key(0), (16, 8))
  # A parameter far below the bound, and well-separated pairs: logits up to 1/0.01 = 100.
  below = jnp.log(0.01) - 50.0
  value, grad = jax.value_and_grad(lambda t: loss(t, z, z)[0])(below)
  assert np.isfinite(value) and np.isfinite(grad)
  assert float(loss(below, z, z)[1]["temperature"]) == pytest.approx(0.01)
  assert float(loss.temperature.clamp(below)) == pytest.approx(math.log(0.01))
  value = loss(loss.temperature.clamp(jnp.log(1.0) + 50.0), z, -z)[0]
  assert np.isfinite(value)
