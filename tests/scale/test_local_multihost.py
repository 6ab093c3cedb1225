"""`launch/local_multihost.sh 2`: the rehearsal of a pod slice on localhost.

Two processes train the micro config, are preempted (SIGTERM) mid-run, resume, and export at
the end; they train exactly as the one-process reference run does and export its
embeddings. A process that dies makes the other exit with an error instead of hanging.
"""

import json
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from cmvt_jax import export
from tests import conftest
from tests import helpers

# Trains or spawns processes: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow

TIGHT = dict(rtol=2e-5, atol=2e-6)
SCRIPT = helpers.REPO / "launch" / "local_multihost.sh"
# The reference run's schedule, so that every step is comparable with it.
SCHEDULE = (
  f"--config.total_steps={conftest.REFERENCE_STEPS}",
  f"--config.checkpoint_every_steps={conftest.REFERENCE_CHECKPOINT_EVERY}",
  "--config.checkpoint.keep=10",
  # Micro steps take ~50 ms: a vote every step lets the SIGTERM land mid-run.
  "--config.distributed.stop_vote_seconds=0",
)


def launch(workdir, data_dir, *overrides: str) -> subprocess.Popen:
  """`DEVICES=2 local_multihost.sh 2` as a user types it (2 hosts of 2 devices: the batch
  splits over hosts and over each host's devices); process 0's output, then the script's."""
  command = [
    "bash",
    str(SCRIPT),
    "2",
    f"--config={helpers.MICRO_CONFIG}",
    f"--workdir={workdir}",
    f"--config.dataset.data_dir={data_dir}",
    *overrides,
  ]
  env = helpers.environment()
  env["LOG_DIR"] = str(workdir.parent / f"logs_{workdir.name}")
  env["DEVICES"] = "2"
  # The test's own interpreter, so that the run works without an activated virtualenv too.
  env["PYTHON"] = sys.executable
  return subprocess.Popen(
    command, cwd=helpers.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


@pytest.fixture(scope="module")
def two_host_run(tmp_path_factory, micro_data_dir):
  """Preempted once (SIGTERM to the launcher) after step 3, resumed to the end, exported."""
  workdir = tmp_path_factory.mktemp("two_hosts") / "run"
  first = launch(workdir, micro_data_dir, *SCHEDULE)
  helpers.wait_for_line(first, lambda line: 3 <= (helpers.trained_step(line) or 0) <= 9)
  first.send_signal(signal.SIGTERM)
  code, output = helpers.finish(first)
  assert code == 0, output[-6000:]
  stopped_at = helpers.complete_steps(workdir)[-1]
  assert stopped_at < conftest.REFERENCE_STEPS, "SIGTERM came too late to interrupt"

  second = launch(workdir, micro_data_dir, *SCHEDULE, "--config.export.at_end=True")
  code, resumed = helpers.finish(second)
  assert code == 0, resumed[-6000:]
  assert f"Resuming from the checkpoint at step {stopped_at}" in resumed
  return workdir


def test_two_hosts_train_exactly_like_one(two_host_run, reference_run):
  losses, reference = helpers.losses(two_host_run), helpers.losses(reference_run)
  assert sorted(losses) == sorted(reference) == list(range(1, conftest.REFERENCE_STEPS + 1))
  np.testing.assert_allclose(
    [losses[s] for s in sorted(losses)], [reference[s] for s in sorted(reference)], **TIGHT
  )
  final = conftest.REFERENCE_STEPS
  helpers.assert_trees_equal(
    helpers.load_state(two_host_run, final)["params"],
    helpers.load_state(reference_run, final)["params"],
    **TIGHT,
  )


def test_each_process_writes_its_own_state_and_only_process_0_the_shared_files(two_host_run):
  final = two_host_run / "checkpoints" / str(conftest.REFERENCE_STEPS)
  iterator_states = sorted(path.name for path in (final / "data").glob("process_*"))
  assert iterator_states == ["process_0-of-2.json", "process_1-of-2.json"]
  # One writer: exactly one train line per step, one config.json, one manifest.
  steps = [line["step"] for line in helpers.train_lines(two_host_run)]
  assert steps == list(range(1, conftest.REFERENCE_STEPS + 1))
  assert json.loads((two_host_run / "config.json").read_text())["processes"] == 2
  parts = sorted(path.name for path in (two_host_run / "embeddings" / "test").glob("part-*"))
  assert parts == ["part-00000-of-00002.npz", "part-00001-of-00002.npz"]


def test_two_hosts_export_the_embeddings_of_one(
  two_host_run, reference_run, tmp_path, micro_data_dir
):
  single = tmp_path / "single"
  shutil.copytree(reference_run, single)
  helpers.run_main(single, mode="export", data_dir=micro_data_dir)
  ours, theirs = (
    export.load_embeddings(two_host_run, "test"),
    export.load_embeddings(single, "test"),
  )
  np.testing.assert_array_equal(ours["id"], theirs["id"])
  np.testing.assert_array_equal(ours["label"], theirs["label"])
  for key in ("video", "audio"):
    np.testing.assert_allclose(ours[key], theirs[key], atol=1e-5)


def test_a_dead_host_makes_the_other_exit_with_a_clear_error(tmp_path, micro_data_dir):
  heartbeat = 5
  survivor, victim = helpers.start_processes(
    tmp_path / "run",
    2,
    *SCHEDULE,
    f"--config.distributed.heartbeat_timeout_seconds={heartbeat}",
    data_dir=micro_data_dir,
  )
  helpers.wait_for_line(survivor, lambda line: helpers.trained_step(line) == 1)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  try:
    # Bounded by the heartbeat timeout (and the runtime's polling), not by the run's length.
    code, output = helpers.finish(survivor, timeout=12 * heartbeat)
  except subprocess.TimeoutExpired:
    survivor.kill()
    pytest.fail("process 0 hung after process 1 died")
  assert code != 0
  assert re.search(r"another (process|task) died", output), output[-3000:]


def test_hosts_with_separate_disks_each_make_the_synthetic_dataset(tmp_path):
  """No shared dataset.data_dir (each host's own cache folder): no host waits forever."""
  port = helpers.free_port()
  processes = []
  for index in range(2):
    env = helpers.environment()
    env["XDG_CACHE_HOME"] = str(tmp_path / f"host_{index}_cache")
    command = helpers.main_command(
      tmp_path / "run",
      "--config.total_steps=2",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={index}",
    )
    processes.append(
      subprocess.Popen(
        command,
        cwd=helpers.REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  outputs = helpers.finish_all(processes)
  assert "each host makes its own copy" in outputs[0]
  for index in range(2):
    made = list((tmp_path / f"host_{index}_cache" / "cmvt_jax").glob("cmvt_synthetic-*"))
    assert len(made) == 1, f"host {index} has no dataset"
  assert sorted(helpers.losses(tmp_path / "run")) == [1, 2]
