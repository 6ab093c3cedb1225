"""The train step is compiled once, from the batch's shapes, before the first batch arrives.

`_TrainLoop` compiles it ahead, so that the compile overlaps the input workers' start-up
instead of following it; if the abstract batch it compiles for differed from the real
batches in any field, shape or dtype, the first step would compile it a second time.
Compiles are seen in jax.monitoring's backend-compile events (which name the function),
batches where the loop takes the step's inputs from one (`train.model_inputs`).
"""

import jax
import pytest

from cmvt_jax import train
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
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert happened.count("jit(train_step)") == 1, happened
  assert happened.count("batch") == 3
  assert happened.index("jit(train_step)") < happened.index("batch"), happened
