"""Shared by the end-to-end tests: running `cmvt_jax.main` as a user does, reading results."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from cmvt_jax.data import datasets
from cmvt_jax.data import spectrogram
from configs import micro

REPO = pathlib.Path(__file__).resolve().parents[1]
MICRO_CONFIG = "configs/micro.py"


def main_command(
  workdir, *overrides: str, config: str = MICRO_CONFIG, mode: str = "train", data_dir=None
) -> list[str]:
  """The command line a user types, with `--config.KEY=VALUE` overrides."""
  command = [
    sys.executable,
    "-m",
    "cmvt_jax.main",
    f"--config={config}",
    f"--workdir={workdir}",
    f"--mode={mode}",
  ]
  if data_dir is not None:
    command.append(f"--config.dataset.data_dir={data_dir}")
  return command + list(overrides)


def environment(devices: int = 1) -> dict[str, str]:
  """The test process's environment with `devices` fake CPU devices per process."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO)
  return env


def run_main(
  workdir, *overrides: str, devices: int = 1, timeout: float = 600, check: bool = True, **kwargs
) -> subprocess.CompletedProcess:
  """Runs `python -m cmvt_jax.main` to completion; raises with its output when it fails."""
  result = subprocess.run(
    main_command(workdir, *overrides, **kwargs),
    cwd=REPO,
    env=environment(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if check and result.returncode != 0:
    raise AssertionError(f"main exited {result.returncode}:\n{result.stderr[-6000:]}")
  return result


def start_main(workdir, *overrides: str, devices: int = 1, **kwargs) -> subprocess.Popen:
  """Starts `python -m cmvt_jax.main` in the background (stderr merged into stdout)."""
  return subprocess.Popen(
    main_command(workdir, *overrides, **kwargs),
    cwd=REPO,
    env=environment(devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def wait_for_line(
  process: subprocess.Popen, predicate: Callable[[str], bool], timeout: float = 300
) -> list[str]:
  """Reads the process's output until a line satisfies `predicate`; returns the lines read."""
  deadline = time.monotonic() + timeout
  lines = []
  while time.monotonic() < deadline:
    line = process.stdout.readline()
    if not line:
      break
    lines.append(line)
    if predicate(line):
      return lines
  process.kill()
  raise AssertionError("the awaited line never came; output:\n" + "".join(lines[-80:]))


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
  """Waits for the process; returns (exit code, the rest of its output)."""
  output, _ = process.communicate(timeout=timeout)
  return process.returncode, output


def kill(process: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
  process.send_signal(signum)


def train_lines(workdir) -> list[dict]:
  """The train lines of metrics.jsonl (those with `loss`), in order."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [line for line in lines if "loss" in line]


def eval_lines(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [line for line in lines if "split" in line]


def losses(workdir) -> dict[int, float]:
  return {line["step"]: line["loss"] for line in train_lines(workdir)}


def complete_steps(workdir) -> list[int]:
  """Steps of the complete (committed) checkpoints."""
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.exists():
    return []
  return sorted(
    int(p.name)
    for p in directory.iterdir()
    if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()
  )


def load_state(workdir, step: int) -> dict:
  """A checkpoint's train state as numpy arrays (whatever mesh wrote it)."""
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def assert_trees_equal(a, b, *, atol: float = 0.0, rtol: float = 0.0) -> None:
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for path_value, x, y in zip(jax.tree_util.tree_flatten_with_path(a)[0], flat_a, flat_b):
    np.testing.assert_allclose(
      x, y, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path_value[0])
    )


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(
  workdir, count: int, *overrides: str, devices: int = 1, **kwargs
) -> list[subprocess.Popen]:
  """`count` processes of one run on localhost (gloo collectives), `devices` each."""
  port = free_port()
  return [
    start_main(
      workdir,
      *overrides,
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={count}",
      f"--process_id={index}",
      devices=devices,
      **kwargs,
    )
    for index in range(count)
  ]


def finish_all(processes: Sequence[subprocess.Popen], timeout: float = 600) -> list[str]:
  outputs = []
  for process in processes:
    code, output = finish(process, timeout)
    assert code == 0, f"a process exited {code}:\n{output[-6000:]}"
    outputs.append(output)
  return outputs


_TRAIN_LINE = re.compile(r"^train\s+(\d+)/\d+ steps")


def trained_step(line: str) -> int | None:
  """The step of a training progress line (`train      3/20 steps ...`), else None."""
  match = _TRAIN_LINE.match(line)
  return int(match.group(1)) if match else None


def wait_for_save_in_progress(workdir, step: int, timeout: float = 300) -> None:
  """Polls until the asynchronous save of `step` is under way (or done).

  Orbax writes a step into `checkpoints/STEP.orbax-checkpoint-tmp` and renames it when done.
  """
  directory = pathlib.Path(workdir) / "checkpoints"
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if (directory / f"{step}.orbax-checkpoint-tmp").exists() or (directory / str(step)).exists():
      return
    time.sleep(0.001)
  raise AssertionError(f"the save of step {step} never started in {directory}")


def file_digests(root) -> dict[str, bytes]:
  """{relative path: content} of every file under `root` (to prove nothing changed)."""
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


TIMING_KEYS = ("clips_per_s", "step_time_s", "mfu")


def metrics_without_timing(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def logged(stderr: str, levels: str = "WEF") -> list[str]:
  """The absl log records of `levels` in a program's stderr (each starts with its level
  letter and the date, e.g. `E1202 19:18:46.06 ... main.py:125] ...`)."""
  return [line for line in stderr.splitlines() if line[:1] in levels and line[1:5].isdigit()]


def make_micro_dataset(data_dir) -> pathlib.Path:
  """Generates and prepares the micro config's synthetic dataset under `data_dir`."""
  config = micro.get_config()
  config.dataset.data_dir = str(data_dir)
  datasets.ensure_synthetic_dataset(
    config.dataset,
    spectrogram.MelSettings.from_config(config.input),
    process_index=0,
    log=lambda message: None,
  )
  return pathlib.Path(data_dir)
