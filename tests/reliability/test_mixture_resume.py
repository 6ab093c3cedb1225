"""A run training on a mixture of two datasets (stored at different rates), killed with
SIGKILL and run again, ends with the uninterrupted run's losses and parameters: the mixed
stream resumes exactly (its grain state is saved with the checkpoint like a single
dataset's). Only the killed run is a subprocess; the others run in this process."""

import logging
import signal

import pytest

from cmvt_jax import train
from cmvt_jax.data import annotations
from cmvt_jax.data import dataset_writer
from configs import micro
from tests import helpers
from tests.data import media

# Trains or spawns processes: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow

MIXTURE = (("cmvt_synthetic", 0.75), ("colours", 0.25))
# No evaluation: the comparison is of training (the final evaluation would add seconds).
ARGS = (
  "--config.total_steps=6",
  "--config.checkpoint_every_steps=3",
  "--config.checkpoint.keep=10",
  "--config.eval.splits=()",
  f"--config.dataset.mixture={MIXTURE}",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, micro_data_dir):
  """The micro dataset (linked) and a second one stored at 12 fps, 24 px, 22.05 kHz."""
  root = tmp_path_factory.mktemp("mixture")
  data = root / "data"
  data.mkdir()
  for path in micro_data_dir.iterdir():
    (data / path.name).symlink_to(path)
  media.colour_list(root / "videos", root / "colours.csv", {"train": (2, 4.0)})
  dataset_writer.prepare(
    root / "videos",
    data,
    "colours",
    mel=media.MEL,
    storage=dataset_writer.StorageSpec(fps=12.0, short_side=24, sample_rate=22050),
    listing=annotations.read_lists(
      [str(root / "colours.csv")], root / "videos", list_format="vggsound"
    ),
    num_workers=1,
    progress=False,
    log=lambda _: None,
  )
  return data


def test_sigkill_during_a_mixture_run_then_resume_matches_the_uninterrupted_run(
  data_dir, tmp_path, caplog
):
  config = micro.get_config()
  config.total_steps, config.checkpoint_every_steps, config.checkpoint.keep = 6, 3, 10
  config.eval.splits, config.dataset.mixture = (), MIXTURE
  config.dataset.data_dir = str(data_dir)
  # The uninterrupted run, in this process (the program the command line runs).
  reference = tmp_path / "reference"
  train.train_and_evaluate(config, str(reference))

  workdir = tmp_path / "run"
  process = helpers.start_main(workdir, *ARGS, data_dir=data_dir)
  helpers.wait_for_line(process, lambda line: helpers.trained_step(line) == 4)
  helpers.kill(process, signal.SIGKILL)
  process.wait()
  complete = helpers.complete_steps(workdir)
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, str(workdir))  # the same run again

  if complete:
    assert f"Resuming from the checkpoint at step {max(complete)}" in caplog.text
  assert helpers.losses(workdir) == helpers.losses(reference)
  helpers.assert_trees_equal(helpers.load_state(workdir, 6), helpers.load_state(reference, 6))
