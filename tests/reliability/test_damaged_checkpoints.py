"""A damaged newest checkpoint falls back to the previous one; none usable is an error."""

import shutil

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


def largest_array_file(checkpoint):
  files = [p for p in (checkpoint / "state").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("damage", ["truncate array data", "delete array data", "delete metadata"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(
  damage, tmp_path, micro_data_dir, reference_run
):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  newest = workdir / "checkpoints" / str(REFERENCE_STEPS)
  if damage == "truncate array data":
    truncate(largest_array_file(newest))
  elif damage == "delete array data":
    largest_array_file(newest).unlink()
  else:
    (newest / "meta" / "metadata").unlink()
  # Ask for more steps than the reference so the run has work to do after the fallback.
  result = helpers.run_main(workdir, *ARGS, data_dir=micro_data_dir)
  previous = REFERENCE_STEPS - REFERENCE_CHECKPOINT_EVERY
  assert f"Skipping checkpoint {REFERENCE_STEPS}:" in result.stderr
  assert "failed to load" in result.stderr
  assert f"Resuming from the checkpoint at step {previous}" in result.stderr
  assert list((workdir / "damaged_checkpoints").iterdir()), "the damaged one must be kept"
  assert helpers.losses(workdir) == helpers.losses(reference_run)
  helpers.assert_trees_equal(
    helpers.load_state(workdir, REFERENCE_STEPS), helpers.load_state(reference_run, REFERENCE_STEPS)
  )


def test_no_usable_checkpoint_is_an_error_unless_asked_to_restart(
  tmp_path, micro_data_dir, reference_run
):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  for checkpoint in (workdir / "checkpoints").iterdir():
    truncate(largest_array_file(checkpoint))
  before = helpers.file_digests(workdir)
  result = helpers.run_main(workdir, *ARGS, check=False, data_dir=micro_data_dir)
  assert result.returncode != 0
  assert "NoUsableCheckpointError: None of the checkpoints in" in result.stderr
  assert helpers.file_digests(workdir) == before, "a refused run must not touch the workdir"

  result = helpers.run_main(
    workdir, *ARGS, "--config.checkpoint.restart_if_unusable=True", data_dir=micro_data_dir
  )
  assert "starting over" in result.stderr
  assert len(list((workdir / "damaged_checkpoints").iterdir())) == 4
  assert helpers.losses(workdir) == helpers.losses(reference_run)
