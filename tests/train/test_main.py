"""`python -m cmvt_jax.main` end to end on the micro config, as a user runs it."""

import json
import os
import signal

import numpy as np
import pytest

from tests import helpers
from tests.conftest import REFERENCE_STEPS

# Trains or spawns processes: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow


def test_one_step_end_to_end(tmp_path, micro_data_dir):
  workdir = tmp_path / "run"
  # Relative, as in the README's `--workdir runs/default` (orbax itself needs absolute paths).
  relative_workdir = os.path.relpath(workdir, helpers.REPO)
  result = helpers.run_main(relative_workdir, "--config.total_steps=1", data_dir=micro_data_dir)
  [train_line] = helpers.train_lines(workdir)
  assert train_line["step"] == 1 and np.isfinite(train_line["loss"])
  for key in ("temperature", "grad_norm", "learning_rate", "clips_per_s", "step_time_s", "mfu"):
    assert key in train_line, key
  [eval_line] = helpers.eval_lines(workdir)
  assert eval_line["split"] == "test" and eval_line["step"] == 1
  for key in (
    "a2v_r1",
    "a2v_r5",
    "a2v_r10",
    "v2a_r1",
    "v2a_r5",
    "v2a_r10",
    "linear_probe_top1",
    "knn_top1",
  ):
    assert 0.0 <= eval_line[f"eval/{key}"] <= 1.0, key
  assert helpers.complete_steps(workdir) == [1]
  recorded = json.loads((workdir / "config.json").read_text())
  assert recorded["config"]["total_steps"] == 1
  assert recorded["packages"]["jax"] == "0.10.2"
  assert list((workdir / "tensorboard").iterdir()), "no TensorBoard event file"

  # The screen: one line per stage, nothing from the libraries, then the summary.
  stages = [line for line in result.stderr.splitlines() if line.startswith(("train ", "eval"))]
  assert stages[0].startswith("train      1/1 steps  100%") and "input wait" in stages[0]
  assert stages[1].startswith("evaluate   48/48 clips  100%")  # test, and train for the probe
  for noise in ("it/s]", "Downloading and preparing", "leaked", "Traceback"):
    assert noise not in result.stderr, noise
  summary = result.stdout
  assert summary.startswith(f"Done: 1 steps in {relative_workdir}.")
  assert "test split, step 1:" in summary and "a2v R@1" in summary
  assert f"checkpoints  {relative_workdir}/checkpoints" in summary
  assert "--mode eval" in summary and "tensorboard --logdir" in summary
  next_commands = summary.split("Next:\n")[1].splitlines()
  assert len(next_commands) == 3 and len({line.index("   # ") for line in next_commands}) == 1


def test_loss_falls_over_30_steps(tmp_path, micro_data_dir):
  workdir = tmp_path / "run"
  helpers.run_main(
    workdir,
    "--config.total_steps=30",
    "--config.optim.learning_rate=3e-3",
    "--config.checkpoint_every_steps=0",
    data_dir=micro_data_dir,
  )
  losses = [line["loss"] for line in helpers.train_lines(workdir)]
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses


def test_reference_run_logs_every_step_once(reference_run):
  steps = [line["step"] for line in helpers.train_lines(reference_run)]
  assert steps == list(range(1, REFERENCE_STEPS + 1))
  assert helpers.complete_steps(reference_run) == [5, 10, 15, 20]


def test_resume_after_sigkill_is_exact(tmp_path, micro_data_dir, reference_run):
  """Killed mid-run by SIGKILL, resumed: the same losses and params as the straight run."""
  workdir = tmp_path / "run"
  args = (
    f"--config.total_steps={REFERENCE_STEPS}",
    "--config.checkpoint_every_steps=5",
    "--config.checkpoint.keep=10",
  )
  process = helpers.start_main(workdir, *args, data_dir=micro_data_dir)
  helpers.wait_for_line(process, lambda line: helpers.trained_step(line) == 11)
  helpers.kill(process, signal.SIGKILL)
  process.wait()
  survived = helpers.complete_steps(workdir)
  assert survived and 5 <= max(survived) < REFERENCE_STEPS, survived
  helpers.run_main(workdir, *args, data_dir=micro_data_dir)
  assert helpers.losses(workdir) == helpers.losses(reference_run)
  helpers.assert_trees_equal(
    helpers.load_state(workdir, REFERENCE_STEPS), helpers.load_state(reference_run, REFERENCE_STEPS)
  )


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path, micro_data_dir, reference_run):
  workdir = tmp_path / "run"
  args = (f"--config.total_steps={REFERENCE_STEPS}", "--config.checkpoint_every_steps=0")
  process = helpers.start_main(workdir, *args, data_dir=micro_data_dir)
  helpers.wait_for_line(process, lambda line: helpers.trained_step(line) == 5)
  helpers.kill(process, signal.SIGTERM)
  code, output = helpers.finish(process)
  assert code == 0, output[-3000:]
  [stopped_at] = helpers.complete_steps(workdir)
  assert 5 <= stopped_at < REFERENCE_STEPS
  assert "SIGTERM" in output
  assert max(helpers.losses(workdir)) <= stopped_at
  helpers.run_main(workdir, *args, data_dir=micro_data_dir)
  assert helpers.losses(workdir) == helpers.losses(reference_run)
  helpers.assert_trees_equal(
    helpers.load_state(workdir, REFERENCE_STEPS), helpers.load_state(reference_run, REFERENCE_STEPS)
  )


def test_larger_total_steps_continues_the_run(tmp_path, micro_data_dir, reference_run):
  workdir = tmp_path / "run"
  helpers.run_main(workdir, "--config.total_steps=4", data_dir=micro_data_dir)
  result = helpers.run_main(workdir, "--config.total_steps=6", data_dir=micro_data_dir)
  assert "Resuming from the checkpoint at step 4" in result.stderr
  assert sorted(helpers.losses(workdir)) == [1, 2, 3, 4, 5, 6]
