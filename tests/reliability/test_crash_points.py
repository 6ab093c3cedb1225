"""A crash at a write point of each kind of file, then the same command again: it resumes.

The sample CI runs of the crash matrix (`crash_harness`; every point and phase is
`python -m benchmarks.crash_matrix`, its table in BENCHMARKS.md): for each kind of file one
write point and phase, drawn with a fixed seed from those the uninterrupted scenario made.
The program is killed there with SIGKILL, the same command runs again, and the outputs must
equal the uninterrupted run's (metrics, losses, final state, export, plots, TensorBoard,
prepared dataset), with nothing left behind that reads as complete but is not.
"""

import numpy as np
import pytest

from cmvt_jax import files
from cmvt_jax.data import synthetic
from tests.data import media
from tests.reliability import crash_harness as harness

# Trains or spawns processes: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow

SEED = 0


def sampled_trial(points, file: str) -> harness.Trial:
  """The seeded trial among the write points of `file` (see harness.FILE_OF_KIND)."""
  chosen = [point for point in points if harness.FILE_OF_KIND[point.kind] == file]
  assert chosen, f"the scenario wrote no {file}"
  (trial,) = harness.sample_trials(chosen, SEED)
  print(f"crash at {trial} ({trial.point.path})")
  return trial


@pytest.mark.parametrize(
  "file",
  [
    "config.json and the workdir probe",
    "TensorBoard events (tensorboardX)",
    "checkpoints (orbax)",
    "export",
    "plots",
  ],
)
def test_a_crash_while_training_resumes_to_the_same_outputs(file, training_reference, tmp_path):
  scenario, points = training_reference.scenario, training_reference.points
  trial = sampled_trial(points, file)
  harness.run_trial(scenario, trial, tmp_path / "trial", training_reference.root)


def test_a_torn_metrics_line_resumes_to_the_same_outputs(training_reference, tmp_path):
  """Killed in the middle of a metrics append (half a line on disk): the rerun drops the torn
  line, rewrites the file and continues. (A crash during that rewrite, and at every other
  metrics point and phase, is in the whole matrix, benchmarks/crash_matrix.py.)"""
  appends = [point for point in training_reference.points if point.kind == "metrics-append"]
  point = appends[int(np.random.default_rng(SEED).integers(len(appends)))]
  trial = harness.Trial(point, files.MIDDLE)
  print(f"crash at {trial} ({point.path})")
  harness.run_trial(training_reference.scenario, trial, tmp_path / "t", training_reference.root)


@pytest.fixture(scope="module")
def parts_reference(tmp_path_factory):
  videos = tmp_path_factory.mktemp("videos")
  synthetic.generate(videos, media.TINY_SPEC, num_workers=1, progress=False)
  scenario = harness.prepare_in_parts(videos)
  return harness.reference(scenario, tmp_path_factory.mktemp("parts"))


@pytest.mark.parametrize(
  "file", ["prepared dataset (scratch clips, TFDS)", "prepare parts", "merge of parts"]
)
def test_a_crash_while_preparing_in_parts_resumes_to_the_same_dataset(
  file, parts_reference, tmp_path
):
  trial = sampled_trial(parts_reference.points, file)
  harness.run_trial(parts_reference.scenario, trial, tmp_path / "trial", parts_reference.root)


def test_a_crash_while_generating_the_synthetic_dataset_resumes(
  training_reference, micro_data_dir, tmp_path
):
  """README command 1 in small, killed while it writes the synthetic videos. The point is
  not enumerated here (a from-nothing reference run costs half a minute): the micro
  dataset has 26 files, so some generating process always writes a 5th."""
  point = harness.WritePoint(0, "synthetic-video", 5, files.WHOLE_FILE, "a generated video")
  reference = tmp_path / "reference"
  reference.mkdir()
  (reference / "data").symlink_to(micro_data_dir)
  (reference / "run").symlink_to(training_reference.root / "run")
  harness.run_trial(
    harness.from_nothing(), harness.Trial(point, files.MIDDLE), tmp_path / "t", reference
  )
