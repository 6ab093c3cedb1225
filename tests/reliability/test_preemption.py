"""SIGTERM (preemption) during a step, a save or an evaluation: save, exit 0, continue exactly."""

import signal
import time

import numpy as np
import pytest

from tests import helpers
from tests.conftest import REFERENCE_CHECKPOINT_EVERY
from tests.conftest import REFERENCE_STEPS

# Trains or spawns processes: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow

ARGS = (
  f"--config.total_steps={REFERENCE_STEPS}",
  f"--config.checkpoint_every_steps={REFERENCE_CHECKPOINT_EVERY}",
  "--config.checkpoint.keep=10",
  f"--config.eval_every_steps={REFERENCE_CHECKPOINT_EVERY}",
)


@pytest.mark.parametrize("moment", ["during a step", "during a save", "during an eval"])
def test_sigterm_saves_exits_cleanly_and_continues_exactly(
  moment, tmp_path, micro_data_dir, reference_run
):
  rng = np.random.default_rng(["during a step", "during a save", "during an eval"].index(moment))
  workdir = tmp_path / "run"
  process = helpers.start_main(workdir, *ARGS, data_dir=micro_data_dir)
  if moment == "during a step":
    step = int(rng.integers(2, REFERENCE_STEPS - 2))
    helpers.wait_for_line(process, lambda line: helpers.trained_step(line) == step)
  elif moment == "during a save":
    helpers.wait_for_save_in_progress(workdir, 2 * REFERENCE_CHECKPOINT_EVERY)
  else:
    # The step-5 checkpoint is saved, then the evaluation starts (it compiles, so it lasts).
    helpers.wait_for_line(
      process, lambda line: helpers.trained_step(line) == REFERENCE_CHECKPOINT_EVERY
    )
    time.sleep(float(rng.uniform(0.05, 0.3)))
  print(f"SIGTERM {moment}")
  helpers.kill(process, signal.SIGTERM)
  code, output = helpers.finish(process)
  assert code == 0, output[-3000:]
  assert "Stopped at step" in output
  stopped_at = int(output.split("Stopped at step ")[1].split()[0])
  assert max(helpers.complete_steps(workdir)) == stopped_at
  assert max(helpers.losses(workdir)) == stopped_at

  result = helpers.run_main(workdir, *ARGS, data_dir=micro_data_dir)
  assert f"Resuming from the checkpoint at step {stopped_at}" in result.stderr
  assert helpers.losses(workdir) == helpers.losses(reference_run)
  helpers.assert_trees_equal(
    helpers.load_state(workdir, REFERENCE_STEPS), helpers.load_state(reference_run, REFERENCE_STEPS)
  )
