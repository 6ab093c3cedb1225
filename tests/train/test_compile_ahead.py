"""The train step is compiled once, from the batch's shapes, while the first batch is fetched.

`_TrainLoop` asks for the first batch on a thread and compiles the step meanwhile, so that
the compile overlaps the input workers' start-up instead of following it; if the abstract
batch it compiles for differed from the real batches in any field, shape or dtype, the
first step would compile it a second time. Compiles are seen in jax.monitoring's
backend-compile events (which name the function), the first batch being made where its
first clip is preprocessed, and batches used where the loop takes the step's inputs from
one (`train.model_inputs`).
"""

import jax
import pytest

from cmvt_jax import train
from cmvt_jax.data import pipeline
from configs import micro

# Trains: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    # A second view per modality adds video_view2 and audio_view2 to the batch.
    {"input.two_views": True, "loss.intra_modal_weight": 0.5},
  ],
  ids=["one_view", "two_views"],
)
def test_the_train_step_is_compiled_once_before_the_first_batch(
  overrides, micro_data_dir, tmp_path, monkeypatch
):
  config = micro.get_config()
  config.dataset.data_dir = str(micro_data_dir)
  config.total_steps = 3
  config.checkpoint_every_steps = 0
  config.export.at_end = False
  for key, value in overrides.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  happened = []

  def on_event(event, seconds, **kwargs):
    if event == BACKEND_COMPILE_EVENT:
      happened.append(kwargs.get("fun_name"))

  model_inputs = train.model_inputs

  def batch_taken(host_batch, **kwargs):
    happened.append("batch")
    return model_inputs(host_batch, **kwargs)

  monkeypatch.setattr(train, "model_inputs", batch_taken)
  random_map = pipeline._TrainTransform.random_map

  def clip_made(self, element, rng):
    happened.append("clip")
    return random_map(self, element, rng)

  # The micro config preprocesses in the process that asks for a batch (no workers).
  monkeypatch.setattr(pipeline._TrainTransform, "random_map", clip_made)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert happened.count("jit(train_step)") == 1, happened
  assert happened.count("batch") == 3
  order = [happened.index(name) for name in ("clip", "jit(train_step)", "batch")]
  assert order == sorted(order), happened
