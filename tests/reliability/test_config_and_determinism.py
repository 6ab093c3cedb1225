"""A checkpoint of another model shape is refused untouched; the same seed gives the same run."""

import shutil

import numpy as np
import pytest

from tests import helpers
from tests.conftest import REFERENCE_CHECKPOINT_EVERY
from tests.conftest import REFERENCE_STEPS

# Trains or spawns processes: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow


def test_checkpoint_of_another_model_shape_is_refused(tmp_path, micro_data_dir, reference_run):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  before = helpers.file_digests(workdir)
  result = helpers.run_main(
    workdir,
    f"--config.total_steps={REFERENCE_STEPS + 5}",
    "--config.model.embed_dim=16",
    "--config.model.video.temporal.num_heads=4",
    check=False,
    data_dir=micro_data_dir,
  )
  assert result.returncode != 0
  assert "ConfigMismatchError" in result.stderr
  assert "model.embed_dim: checkpoint 32, now 16" in result.stderr
  assert "model.video.temporal.num_heads: checkpoint 2, now 4" in result.stderr
  assert helpers.file_digests(workdir) == before


def test_same_config_and_seed_give_bitwise_identical_metrics(
  tmp_path, micro_data_dir, reference_run
):
  workdir = tmp_path / "run"
  helpers.run_main(
    workdir,
    f"--config.total_steps={REFERENCE_STEPS}",
    f"--config.checkpoint_every_steps={REFERENCE_CHECKPOINT_EVERY}",
    "--config.checkpoint.keep=10",
    data_dir=micro_data_dir,
  )
  again, reference = (
    helpers.metrics_without_timing(workdir),
    helpers.metrics_without_timing(reference_run),
  )
  assert again == reference
  assert any("eval/a2v_r1" in line for line in reference)
  helpers.assert_trees_equal(
    helpers.load_state(workdir, REFERENCE_STEPS), helpers.load_state(reference_run, REFERENCE_STEPS)
  )


def test_switching_the_attention_implementation_resumes_the_checkpoint(
  tmp_path, micro_data_dir, reference_run
):
  """`model.attention_implementation` is not a shape key: a run trained with "lax" (the CPU's
  choice) continues from its checkpoint with "splash" (TPU interpret mode here), and the
  steps it adds are the uninterrupted run's to float rounding."""
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  resume_from = REFERENCE_STEPS - REFERENCE_CHECKPOINT_EVERY
  shutil.rmtree(workdir / "checkpoints" / str(REFERENCE_STEPS))
  helpers.run_main(
    workdir,
    f"--config.total_steps={resume_from + 2}",
    f"--config.checkpoint_every_steps={REFERENCE_CHECKPOINT_EVERY}",
    "--config.checkpoint.keep=10",
    "--config.model.attention_implementation=splash",
    data_dir=micro_data_dir,
  )
  resumed, reference = helpers.losses(workdir), helpers.losses(reference_run)
  assert sorted(resumed) == list(range(1, resume_from + 3))
  # The first step's loss is splash's forward pass over the restored parameters: equal to
  # float rounding. The second follows one Adam update from splash's gradients, which equal
  # lax's to float rounding (test_attention_implementations); Adam divides each gradient by
  # the root of its second moment, so near-zero components magnify that rounding (measured:
  # 0.25% on the micro model), half the tolerance.
  first, second = resume_from + 1, resume_from + 2
  np.testing.assert_allclose(resumed[first], reference[first], rtol=1e-5)
  np.testing.assert_allclose(resumed[second], reference[second], rtol=5e-3)
