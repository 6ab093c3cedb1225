"""SIGKILL from outside, at a random step and at a random moment inside an asynchronous
checkpoint save, never loses the run.

Each trial (seeded, its draw printed) kills the micro run either right after a random step
or at a random moment after a checkpoint save has started, then runs the same command again.
The resumed run must restore only complete checkpoints and end with the same losses and
parameters as the uninterrupted reference run. Kills at each write point (before, in the
middle of, after every file write) are test_crash_points.py's.
"""

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
)


def draw(trial: int) -> dict:
  rng = np.random.default_rng(1000 + trial)
  if trial % 2 == 0:
    return {"when": "after step", "step": int(rng.integers(2, REFERENCE_STEPS - 2))}
  save = int(rng.integers(1, REFERENCE_STEPS // REFERENCE_CHECKPOINT_EVERY))
  return {
    "when": "inside save",
    "step": save * REFERENCE_CHECKPOINT_EVERY,
    "delay_s": float(rng.uniform(0.0, 0.4)),
  }


@pytest.mark.parametrize("trial", range(2))
def test_sigkill_then_resume_matches_the_uninterrupted_run(
  trial, tmp_path, micro_data_dir, reference_run
):
  fault = draw(trial)
  print(f"trial {trial}: SIGKILL {fault}")
  workdir = tmp_path / "run"
  process = helpers.start_main(workdir, *ARGS, data_dir=micro_data_dir)
  if fault["when"] == "after step":
    helpers.wait_for_line(process, lambda line: helpers.trained_step(line) == fault["step"])
  else:
    helpers.wait_for_save_in_progress(workdir, fault["step"])
    time.sleep(fault["delay_s"])
  helpers.kill(process, signal.SIGKILL)
  process.wait()
  complete = helpers.complete_steps(workdir)

  result = helpers.run_main(workdir, *ARGS, data_dir=micro_data_dir)
  if complete:
    assert f"Resuming from the checkpoint at step {max(complete)}" in result.stderr
  else:
    assert "Starting a new run" in result.stderr
  assert helpers.losses(workdir) == helpers.losses(reference_run)
  helpers.assert_trees_equal(
    helpers.load_state(workdir, REFERENCE_STEPS), helpers.load_state(reference_run, REFERENCE_STEPS)
  )
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
