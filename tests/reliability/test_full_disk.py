"""A real full disk: a small tmpfs as the workdir's device, so that orbax's, TensorBoard's and
our own writes all meet ENOSPC. The run stops with one line naming the path; once space is
freed, the same command resumes and ends with the uninterrupted run's outputs."""

import math
import pathlib
import subprocess

import pytest

from tests import helpers
from tests.reliability import crash_harness as harness

# Trains or spawns processes: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow

PAGE = 4096  # tmpfs charges whole pages


def used_bytes(folder: pathlib.Path) -> int:
  """What `folder`'s files take on a tmpfs."""
  return sum(
    math.ceil(path.stat().st_size / PAGE) * PAGE for path in folder.rglob("*") if path.is_file()
  )


@pytest.fixture
def small_disk(tmp_path):
  """Mounts a tmpfs at tmp_path/disk; yields a function that sets its size in bytes."""
  mount_point = tmp_path / "disk"
  mount_point.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
    capture_output=True,
    text=True,
  )
  if mounted.returncode != 0:
    pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.strip()}); needs root")

  def resize(size: int) -> None:
    size = math.ceil(size / PAGE) * PAGE
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

  yield mount_point, resize
  subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("full_at", ["the second checkpoint", "the plots"])
def test_a_full_disk_stops_the_run_in_one_line_and_a_rerun_resumes(
  full_at, small_disk, training_reference
):
  root, resize = small_disk
  expected = training_reference.root / "run"
  if full_at == "the second checkpoint":
    # The first checkpoint fits, with room to spare; the second does not.
    size = used_bytes(expected / "checkpoints" / "2") * 1.5
  else:
    size = used_bytes(expected) - used_bytes(expected / "plots") // 2
  resize(size)
  command = training_reference.scenario.command(0, root)

  stopped = harness.run(command)
  assert stopped.returncode == 1
  errors = helpers.logged(stopped.stderr)
  assert len(errors) == 1, stopped.stderr[-5000:]
  assert "Traceback" not in stopped.stderr, stopped.stderr[-5000:]
  assert f"No space left on the device of {root / 'run'}" in errors[0]
  if full_at == "the second checkpoint":
    assert f"{root / 'run' / 'checkpoints'} " in errors[0]
    assert helpers.complete_steps(root / "run") == [2]  # the last complete checkpoint
  else:  # training finished; the export or the plots met the full disk
    assert helpers.complete_steps(root / "run") == [2, 4]

  resize(64 << 20)  # space freed
  resumed = harness.run(command)
  assert resumed.returncode == 0, resumed.stderr[-5000:]
  harness.check_training(root, training_reference.root)
