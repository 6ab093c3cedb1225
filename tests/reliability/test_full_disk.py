"""A real full disk: a small tmpfs as the workdir's device, so that orbax's, TensorBoard's and
our own writes all meet ENOSPC. The run stops with one line naming the path; once space is
freed, the same command resumes and ends with the uninterrupted run's outputs."""

import math
import os
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


def disk_used(mount_point: pathlib.Path) -> int:
  """Bytes the tmpfs at `mount_point` has charged so far (directories and metadata included,
  which a sum of file sizes misses)."""
  stats = os.statvfs(mount_point)
  return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def stops_in_one_line(result: subprocess.CompletedProcess, workdir: pathlib.Path) -> str:
  """Asserts the run exited 1 with one logged error and no traceback; returns that error."""
  assert result.returncode == 1, result.stderr[-5000:]
  errors = helpers.logged(result.stderr)
  assert len(errors) == 1, result.stderr[-5000:]
  assert "Traceback" not in result.stderr, result.stderr[-5000:]
  assert f"No space left on the device of {workdir}" in errors[0]
  return errors[0]


def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_a_rerun_resumes(
  small_disk, training_reference
):
  root, resize = small_disk
  expected = training_reference.root / "run"
  # The first checkpoint fits, with room to spare; the second does not.
  resize(used_bytes(expected / "checkpoints" / "2") * 1.5)
  command = training_reference.scenario.command(0, root)

  error = stops_in_one_line(harness.run(command), root / "run")
  assert f"{root / 'run' / 'checkpoints'} " in error
  assert helpers.complete_steps(root / "run") == [2]  # the last complete checkpoint

  resize(64 << 20)  # space freed
  resumed = harness.run(command)
  assert resumed.returncode == 0, resumed.stderr[-5000:]
  harness.check_training(root, training_reference.root)


def test_a_full_disk_at_the_plots_stops_in_one_line_and_a_rerun_finishes(
  small_disk, training_reference
):
  root, resize = small_disk
  command = training_reference.scenario.command(0, root)
  # Everything but the plots, on a roomy disk: the run is killed just before its first plot.
  killed = harness.run(command, crash="plot:1:before")
  assert killed.returncode == -9 and helpers.complete_steps(root / "run") == [2, 4]
  # Then the disk shrinks to what is there plus half of what the plots take: the rerun, which
  # has only the plots left to do, meets the full disk there. (Measured from the disk itself:
  # a sum of file sizes misses what tmpfs charges for directories, which differs by kernel.)
  resize(disk_used(root) + used_bytes(training_reference.root / "run" / "plots") // 2)

  stops_in_one_line(harness.run(command), root / "run")
  assert helpers.complete_steps(root / "run") == [2, 4]

  resize(64 << 20)  # space freed
  finished = harness.run(command)
  assert finished.returncode == 0, finished.stderr[-5000:]
  harness.check_training(root, training_reference.root)
