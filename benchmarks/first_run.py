"""README command 1, timed as a new user meets it: old and new revisions side by side.

For each git revision (default: the previous landing and this checkout's HEAD), a fresh
clone of that revision runs the README's main command exactly as written
(`python -m cmvt_jax.main --config configs/default.py --workdir runs/default`) with an empty
cache folder (`XDG_CACHE_HOME`, so the dataset is generated and prepared again) and no
persistent compilation cache. The install is left out (one virtualenv, this one, serves
every revision; the pins did not change). Revisions alternate over `--repeats` rounds, so
both meet the machine's load alike. Printed as a Markdown table: wall time, the steps/s
of training (median of its logged steps), where the wall time went (the stage lines' own
clocks) and the final test metrics.

  python -m benchmarks.first_run [--revisions OLD NEW] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMAND = [
  sys.executable,
  "-m",
  "cmvt_jax.main",
  "--config",
  "configs/default.py",
  "--workdir",
  "runs/default",
]
# A finished stage's line: `NAME  done/total unit  100%  M:SS ...` (cmvt_jax/console.py).
_STAGE = re.compile(r"^(generate|prepare|train|evaluate|export|plots)\s+\S+ .*?100%\s+(\d+):(\d\d)")


def run_revision(revision: str, root: pathlib.Path) -> dict:
  """Clones `revision`, runs command 1 there with a fresh cache; returns what it measured."""
  checkout = root / f"clone-{revision}"
  subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True)
  subprocess.run(["git", "-C", str(checkout), "checkout", "-q", revision], check=True)
  cache = root / f"cache-{revision}"
  env = {
    key: value
    for key, value in os.environ.items()
    if not key.startswith(("JAX_COMPILATION_CACHE", "XLA_FLAGS", "PYTHONPATH"))
  }
  env["XDG_CACHE_HOME"] = str(cache)
  started = time.perf_counter()
  result = subprocess.run(COMMAND, cwd=checkout, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - started
  if result.returncode:
    raise RuntimeError(f"{revision}: exit {result.returncode}\n{result.stderr[-3000:]}")
  records = [
    json.loads(line)
    for line in (checkout / "runs/default/metrics.jsonl").read_text().splitlines()
    if line.strip()
  ]
  train = [record for record in records if "loss" in record]
  final = [record for record in records if record.get("split") == "test"][-1]
  stages = {}
  for line in result.stderr.splitlines():
    match = _STAGE.match(line)
    if match:
      stages[match.group(1)] = 60 * int(match.group(2)) + int(match.group(3))
  return {
    "revision": revision,
    "wall_s": wall,
    "steps": train[-1]["step"],
    "steps_per_s": 1 / statistics.median(record["step_time_s"] for record in train[1:]),
    "a2v_r1": final["eval/a2v_r1"],
    "v2a_r1": final["eval/v2a_r1"],
    "stages": stages,
    "leaked_warning": "leaked shared_memory" in result.stderr,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--revisions", nargs="+", default=["HEAD~1", "HEAD"])
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()
  revisions = [
    subprocess.run(
      ["git", "rev-parse", "--short", revision], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    for revision in args.revisions
  ]
  rows = []
  with tempfile.TemporaryDirectory(prefix="cmvt_first_run_") as root:
    for round_index in range(args.repeats):
      for revision in revisions:
        row = run_revision(revision, pathlib.Path(root) / f"round{round_index}")
        print(json.dumps(row), flush=True)
        rows.append(row)
  cpu = next(
    (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?"
  )
  print(
    f"\n{time.strftime('%Y-%m-%d %H:%M')}, {cpu}, {os.cpu_count()} cores, "
    f"load average after: {os.getloadavg()[0]:.1f}. Command: python -m benchmarks.first_run "
    f"--revisions {' '.join(revisions)} --repeats {args.repeats}\n"
  )
  print("| revision | wall | steps | steps/s | a→v R@1 | v→a R@1 | stages (their own clocks) |")
  print("|---|---:|---:|---:|---:|---:|---|")
  for row in rows:
    stages = ", ".join(f"{name} {seconds} s" for name, seconds in row["stages"].items()) or "–"
    print(
      f"| {row['revision']} | {row['wall_s'] // 60:.0f} min {row['wall_s'] % 60:.0f} s | "
      f"{row['steps']} | {row['steps_per_s']:.2f} | {row['a2v_r1']:.3f} | {row['v2a_r1']:.3f} | "
      f"{stages} |"
    )


if __name__ == "__main__":
  main()
