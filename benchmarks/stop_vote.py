"""Training speed of a 2-process localhost run: what the multi-host stop vote costs.

Runs `launch/local_multihost.sh 2` (the micro config, one fake device per process) from one
or more checkouts, one after the other, and prints the training steps per second measured
by the run itself (the logged `step_time_s` after the first log interval, which holds the
compilation). Each checkout trains on the same generated dataset.

  python -m benchmarks.stop_vote [--repos . /path/to/old/checkout] [--steps 300]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from benchmarks import quality

REPO = pathlib.Path(__file__).resolve().parents[1]


def steps_per_second(repo: pathlib.Path, workdir: pathlib.Path, data_dir: str, steps: int) -> dict:
  command = [
    "bash",
    "launch/local_multihost.sh",
    "2",
    "--config=configs/micro.py",
    f"--workdir={workdir}",
    f"--config.dataset.data_dir={data_dir}",
    f"--config.total_steps={steps}",
    "--config.log_every_steps=25",
    "--config.checkpoint_every_steps=0",
  ]
  env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
  result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
  if result.returncode != 0:
    raise RuntimeError(f"{repo}: exited {result.returncode}:\n{result.stderr[-3000:]}")
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  times = [line["step_time_s"] for line in lines if "step_time_s" in line][1:]
  revision = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
  ).stdout.strip()
  return {"repo": str(repo), "revision": revision, "steps_per_s": 1 / statistics.median(times)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repos", nargs="+", default=[str(REPO)])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--data_dir", default=None, help="default: a temporary folder")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as scratch:
    data_dir = args.data_dir or f"{scratch}/data"
    rows = [
      steps_per_second(
        pathlib.Path(repo).resolve(), pathlib.Path(scratch) / f"run{i}", data_dir, args.steps
      )
      for i, repo in enumerate(args.repos)
    ]
  print(
    f"{datetime.date.today()}, {quality.cpu_name()}, {os.cpu_count()} cores, {args.steps} steps"
  )
  print("| checkout | revision | training steps/s (median of 25-step intervals) |")
  print("| --- | --- | --- |")
  for row in rows:
    print(f"| {row['repo']} | {row['revision']} | {row['steps_per_s']:.2f} |")


if __name__ == "__main__":
  main()
