"""files.py: atomic whole-file writes, appends, removals; the crash hooks; a full disk named."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cmvt_jax import files
from tests import helpers


def test_write_replaces_an_existing_file(tmp_path):
  path = tmp_path / "a.json"
  files.write_json(path, {"run": 1}, kind="config.json")
  files.write_json(path, {"run": 2}, kind="config.json")  # a second run of the same command
  assert json.loads(path.read_text()) == {"run": 2}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "figure.png"
  files.write_bytes(path, b"old", kind="plot")
  with pytest.raises(RuntimeError, match="drawing failed"):
    with files.replacing(path, kind="plot") as temporary:
      temporary.write_bytes(b"half a fig")
      raise RuntimeError("drawing failed")
  assert path.read_bytes() == b"old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]


def test_append_copy_move_remove(tmp_path):
  path = tmp_path / "metrics.jsonl"
  files.append_line(path, '{"step": 1}', kind="metrics-append")
  files.append_line(path, '{"step": 2}', kind="metrics-append")
  files.sync(path)
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
  copied = files.copy(path, tmp_path / "copy.jsonl", kind="part-copy")
  assert copied.read_text() == path.read_text()
  (tmp_path / "tree").mkdir()
  moved = files.move(copied, tmp_path / "tree" / "moved.jsonl", kind="merge-move")
  assert moved.exists() and not copied.exists()
  files.remove(tmp_path / "tree", kind="merge-clean")
  files.remove(tmp_path / "absent", kind="merge-clean")  # nothing there: nothing to do
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_leftover_temporaries_are_removed(tmp_path):
  (tmp_path / f"config.json{files.TEMPORARY_SUFFIX}").write_text("{")
  (tmp_path / "config.json").write_text("{}")
  assert [p.name for p in files.remove_temporaries(tmp_path)] == [
    f"config.json{files.TEMPORARY_SUFFIX}"
  ]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# ----------------------------------------------------------------------------- crash hooks

# Writes twice to each of three files, as a program would.
PROGRAM = textwrap.dedent(
  """
  import sys
  from cmvt_jax import files
  folder = sys.argv[1]
  for run in (1, 2):
    files.write_json(f"{folder}/config.json", {"run": run}, kind="config.json")
    files.append_line(f"{folder}/metrics.jsonl", '{"step": %d}' % run, kind="metrics-append")
  files.remove(f"{folder}/tree", kind="merge-clean")
  """
)


def run_program(folder, *, crash=None, write_log=None):
  (folder / "tree" / "sub").mkdir(parents=True)
  for name in ("a", "b", "sub/c", "sub/d"):
    (folder / "tree" / name).write_text(name)
  env = helpers.environment()
  if crash:
    env[files.CRASH_ENV] = crash
  if write_log:
    env[files.WRITE_LOG_ENV] = str(write_log)
  return subprocess.run(
    [sys.executable, "-c", PROGRAM, str(folder)],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
    start_new_session=True,
  )


def test_the_write_log_lists_every_write_point_with_its_phases(tmp_path):
  log = tmp_path / "writes.log"
  (tmp_path / "out").mkdir()
  assert run_program(tmp_path / "out", write_log=log).returncode == 0
  rows = [line.split("\t")[1:4] for line in log.read_text().splitlines()]
  assert rows == [
    ["config.json", "1", "before,middle,after"],
    ["metrics-append", "1", "before,middle,after"],
    ["config.json", "2", "before,middle,after"],
    ["metrics-append", "2", "before,middle,after"],
    ["merge-clean", "1", "before,middle,after"],
  ]


@pytest.mark.parametrize(
  "phase, config, temporary",
  [("before", {"run": 1}, None), ("middle", {"run": 1}, "half"), ("after", {"run": 2}, None)],
)
def test_a_crash_in_a_whole_file_write_leaves_the_old_or_the_new_file(
  phase, config, temporary, tmp_path
):
  result = run_program(tmp_path, crash=f"config.json:2:{phase}")
  assert result.returncode == -signal.SIGKILL
  assert f"killed at config.json #2 {phase}" in result.stderr
  assert json.loads((tmp_path / "config.json").read_text()) == config
  leftover = tmp_path / f"config.json{files.TEMPORARY_SUFFIX}"
  if temporary is None:
    assert not leftover.exists()
  else:  # half of the new file's bytes, under the temporary name only
    new = json.dumps({"run": 2}, indent=2) + "\n"
    assert leftover.read_text() == new[: len(new) // 2]


def test_a_crash_in_the_middle_of_an_append_leaves_half_a_line(tmp_path):
  result = run_program(tmp_path, crash="metrics-append:2:middle")
  assert result.returncode == -signal.SIGKILL
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step'


def test_a_crash_in_the_middle_of_a_tree_removal_leaves_some_of_it(tmp_path):
  result = run_program(tmp_path, crash="merge-clean:1:middle")
  assert result.returncode == -signal.SIGKILL
  left = sorted(str(p.relative_to(tmp_path / "tree")) for p in (tmp_path / "tree").rglob("*"))
  assert left == ["sub", "sub/c", "sub/d"]


def test_an_unarmed_program_is_not_killed(tmp_path):
  result = run_program(tmp_path, crash="config.json:3:before")  # there is no third write
  assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- full disk


def test_a_full_disk_is_named_by_path():
  with pytest.raises(files.DiskFullError) as raised:
    with files.naming_full_disk("/runs/a/metrics.jsonl"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  assert str(raised.value).startswith(
    "No space left on the device of /runs/a/metrics.jsonl (No space left on device). Free"
  )
  assert raised.value.errno == errno.ENOSPC


def test_a_full_disk_inside_a_library_error_is_found():
  """orbax's array writer (TensorStore) raises ValueError with the OS error in its text."""
  tensorstore = ValueError(
    'RESOURCE_EXHAUSTED: Error writing local file "/runs/a/checkpoints/4": Failed to write '
    "32808 bytes to file 11: No space left on device [os_error_code='28']"
  )
  try:
    raise RuntimeError("Save Finalize thread failed") from tensorstore
  except RuntimeError as wrapped:
    assert files.full_disk_cause(wrapped).errno == errno.ENOSPC
  assert files.full_disk_cause(ValueError("a config problem")) is None
  with pytest.raises(ValueError, match="a config problem"):
    with files.naming_full_disk("/runs/a"):
      raise ValueError("a config problem")  # not a full disk: unchanged
