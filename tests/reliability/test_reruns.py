"""Every command run a second time exits 0 and keeps or replaces its outputs as the README says.

Each test starts from a copy of the crash harness's finished micro run (4 steps, checkpoints
at 2 and 4, evaluations at 2 and 4, export and plots) and runs `python -m cmvt_jax.main` as
a user would.
"""

import json
import pathlib

import pytest

from cmvt_jax import files
from tests import helpers
from tests.reliability import crash_harness as harness

# Trains or spawns processes: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow


@pytest.fixture
def finished(tmp_path, training_reference) -> pathlib.Path:
  """A copy of the finished run: `ROOT/run`; returns ROOT."""
  harness.copy_tree(training_reference.root / "run", tmp_path / "run")
  return tmp_path


def main(training_reference, root: pathlib.Path, *extra: str):
  """The training scenario's command on `root` with `extra` flags; must exit 0."""
  result = harness.run([*training_reference.scenario.command(0, root), *extra])
  assert result.returncode == 0, result.stderr[-5000:]
  return result


def test_train_again_on_a_finished_run_changes_nothing(finished, training_reference):
  workdir = finished / "run"
  before = helpers.file_digests(workdir)
  # What interrupted writes leave in the workdir's own folders is removed.
  leftovers = [
    workdir / f"metrics.jsonl{files.TEMPORARY_SUFFIX}",
    workdir / "plots" / f"attention.png{files.TEMPORARY_SUFFIX}",
    workdir / "embeddings" / "test" / f"part-00000-of-00001.npz{files.TEMPORARY_SUFFIX}",
  ]
  for path in leftovers:
    path.write_bytes(b"half")
  result = main(training_reference, finished)
  assert "The evaluation at step 4 is in metrics.jsonl already" in result.stderr
  assert "The export of step 4 is complete already" in result.stderr
  assert "The plots of step 4 are complete already" in result.stderr
  assert helpers.file_digests(workdir) == before  # not one file written; leftovers gone


def test_train_again_does_only_the_missing_end_stages(finished, training_reference):
  """What a crash after the last checkpoint leaves: no final eval line, an export without
  its manifest, a figure missing."""
  workdir = finished / "run"
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  final_eval = [i for i, line in enumerate(lines) if '"split"' in line and '"step": 4' in line]
  del lines[final_eval[0]]
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  (workdir / "embeddings" / "test" / "manifest.json").unlink()
  (workdir / "plots" / "attention.png").unlink()
  checkpoints_before = helpers.file_digests(workdir / "checkpoints")

  result = main(training_reference, finished)
  assert "Resuming from the checkpoint at step 4" in result.stderr
  assert "done before (the checkpoint at step 4)" in result.stderr  # no step ran
  assert helpers.file_digests(workdir / "checkpoints") == checkpoints_before
  harness.check_training(finished, training_reference.root)


def test_an_extended_run_continues_past_a_torn_line_and_a_rerun_changes_nothing(
  finished, training_reference
):
  """Extending a finished run with a larger total_steps. Its metrics.jsonl ends with what a
  kill (or a full disk) during an append left, as reported: `{"step": 11, "lo` made every
  later resume fail with JSONDecodeError and grain teardown tracebacks."""
  workdir = finished / "run"
  torn = len((workdir / "metrics.jsonl").read_text().splitlines()) + 1
  with (workdir / "metrics.jsonl").open("a") as f:
    f.write('{"step": 11, "lo')
  result = main(training_reference, finished, "--config.total_steps=6")
  assert f"Dropping the last line of {workdir / 'metrics.jsonl'} (line {torn})" in result.stderr
  assert "Traceback" not in result.stderr
  records = harness.strict_records(workdir)
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert [(r["step"], r["split"]) for r in records if "split" in r] == [
    (2, "test"),
    (4, "test"),
    (6, "test"),
  ]
  # The first four steps are the finished run's, untouched.
  assert {k: v for k, v in harness.by_key(workdir).items() if k[0] <= 4} == harness.by_key(
    training_reference.root / "run"
  )
  for folder in ("embeddings/test", "plots"):
    assert json.loads((workdir / folder / "manifest.json").read_text())["step"] == 6
  check_tensorboard_shows_the_metrics(workdir)
  harness.check_no_leftovers(workdir)

  before = helpers.file_digests(workdir)
  main(training_reference, finished, "--config.total_steps=6")
  assert helpers.file_digests(workdir) == before


def check_tensorboard_shows_the_metrics(workdir: pathlib.Path) -> None:
  """Every number of metrics.jsonl is in TensorBoard at its step, once (float32)."""
  shown = harness.tensorboard_scalars(workdir / "tensorboard")
  expected = {
    (key, record["step"]): float(value)
    for record in helpers.metrics_without_timing(workdir)
    for key, value in record.items()
    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
  }
  assert shown.keys() == expected.keys()
  for key, value in expected.items():
    assert shown[key] == pytest.approx(value, rel=1e-6), key


def test_eval_export_and_plots_modes_twice(finished, training_reference):
  """Each mode twice: exit 0, outputs replaced by equal ones, one eval line per (step,
  split), no step twice in TensorBoard."""
  for mode in ("eval", "export", "plots"):
    for _ in range(2):
      main(training_reference, finished, f"--mode={mode}")
  harness.check_training(finished, training_reference.root)
  check_tensorboard_shows_the_metrics(finished / "run")


@pytest.mark.parametrize("error", ["a damaged metrics line", "a model of another shape"])
def test_a_user_error_at_resume_is_one_line_and_exit_1(error, finished, training_reference):
  """With grain worker processes running the input, as in the default config: nothing but
  the error line, no teardown tracebacks."""
  workdir = finished / "run"
  extra = ["--config.input.num_workers=2"]
  if error == "a damaged metrics line":
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    expected = f"{workdir / 'metrics.jsonl'} line 2 is not JSON"
  else:
    extra.append("--config.model.embed_dim=16")
    expected = "ConfigMismatchError"
  before = helpers.file_digests(workdir)
  result = harness.run([*training_reference.scenario.command(0, finished), *extra])
  assert result.returncode == 1
  records = helpers.logged(result.stderr)
  assert len(records) == 1 and expected in records[0], result.stderr[-5000:]
  assert "Traceback" not in result.stderr, result.stderr[-5000:]
  assert helpers.file_digests(workdir) == before
