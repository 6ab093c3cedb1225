"""Bad configuration is refused with one clear message, a non-zero exit, and no workdir."""

import pytest

from tests import helpers

# Trains or spawns processes: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
  "overrides,devices,message",
  [
    (["--config.bogus=1"], 1, "config has no key 'bogus'; its keys are: batch_size, checkpoint"),
    (
      ["--config.model.vido.width=3"],
      1,
      "config.model has no key 'vido'; its keys are: attention_implementation, audio",
    ),
    (["--config.total_steps=abc"], 1, "--config.total_steps=abc: invalid literal for int()"),
    (
      ["--config.batch_size=6", "--config.eval.batch_size=4"],
      4,
      "batch_size=6 must be divisible by the 4 devices",
    ),
    (['--config.mesh.axes=(("data", 3),)'], 4, "has 3 positions but there are 4 devices"),
    (
      ["--config.dataset.name=no_such_dataset"],
      1,
      "No prepared dataset at {data_dir}/no_such_dataset/1.0.0: prepare one with",
    ),
    (["--config.objective=supervised"], 1, "needs config.model.num_classes > 0"),
    (
      ["--config.model.attention_implementation=cudnn"],
      1,
      "config.model.attention_implementation must be unset (chosen for the platform) or one "
      "of ('lax', 'splash'); got 'cudnn'",
    ),
  ],
)
def test_bad_config_is_refused_before_any_work(
  tmp_path, micro_data_dir, overrides, devices, message
):
  workdir = tmp_path / "run"
  result = helpers.run_main(
    workdir, *overrides, devices=devices, check=False, data_dir=micro_data_dir
  )
  assert result.returncode != 0
  assert message.format(data_dir=micro_data_dir) in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_unwritable_workdir_is_refused(tmp_path, micro_data_dir):
  # A path under a regular file cannot be created, whoever runs the test (even root).
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  result = helpers.run_main(blocker / "run", check=False, data_dir=micro_data_dir)
  assert result.returncode != 0
  assert f"--workdir {blocker / 'run'} is not writable" in result.stderr, result.stderr[-2000:]
  assert blocker.read_text() == "not a folder"
